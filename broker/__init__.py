"""The node's MQTT broker: Mosquitto 2 configuration templates, the `wis2-broker` launcher and the
simulated Global Broker's validating hook."""
