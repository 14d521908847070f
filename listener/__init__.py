"""The MQTT listener: file-diffusion events -> runs of Prefect deployments (listener.service)."""
