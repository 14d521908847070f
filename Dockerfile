# Image of the chain's own processes (Prefect worker, MQTT listener, delivery monitor, broker
# config renderer, simulated Global Broker). The broker itself runs the official eclipse-mosquitto image.
FROM python:3.11.11-slim-bookworm

# mosquitto_passwd renders the broker's password file (broker-config service).
RUN apt-get update \
    && apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/wis2-chain
COPY pyproject.toml README.md prefect.yaml ./
COPY wis2 ./wis2
COPY chain ./chain
COPY flows ./flows
COPY blocks ./blocks
COPY listener ./listener
COPY worker ./worker
COPY delivery ./delivery
COPY broker ./broker
COPY cli ./cli
COPY data ./data
RUN pip install --no-cache-dir -e .

# WIS2 validator bundles: from a local copy when one is mounted at /bundles, else downloaded.
ENV WIS2_PROJECT_DIR=/opt/wis2-chain
CMD ["wis2-chain", "--help"]
