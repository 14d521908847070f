# Image of the chain's own processes (Prefect worker, MQTT listener, broker config renderer,
# simulated Global Broker, demo file server, delivery monitor). The broker itself runs the eclipse-mosquitto image.
#
# Behind a TLS-intercepting proxy, give pip the proxy's CA bundle as the build secret `proxy_ca`
# (BuildKit; the CA is used for this build only, never stored in the image):
#   DOCKER_BUILDKIT=1 docker build --secret id=proxy_ca,src=/etc/ssl/certs/ca-certificates.crt \
#       -t wis2-chain:0.1.0 .
# Without the secret, pip uses the image's own CA certificates.
FROM python:3.11.11-slim-bookworm

# mosquitto_passwd renders the broker's password file (broker-config service); the files are
# handed to user mosquitto, uid/gid 1883 as in the eclipse-mosquitto image that reads them.
RUN (getent group mosquitto || groupadd -r -g 1883 mosquitto) \
    && (getent passwd mosquitto || useradd -r -u 1883 -g mosquitto -d /var/lib/mosquitto \
        -s /usr/sbin/nologin mosquitto) \
    && apt-get update \
    && apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/wis2-chain
# The dependencies first (a layer that a change of the code does not rebuild), then the code.
COPY pyproject.toml ./
RUN --mount=type=secret,id=proxy_ca \
    if [ -s /run/secrets/proxy_ca ]; then export PIP_CERT=/run/secrets/proxy_ca; fi; \
    touch README.md && pip install --no-cache-dir . && pip uninstall -y wis2-chain \
    && rm -rf README.md build ./*.egg-info
COPY README.md prefect.yaml ./
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
RUN --mount=type=secret,id=proxy_ca \
    if [ -s /run/secrets/proxy_ca ]; then export PIP_CERT=/run/secrets/proxy_ca; fi; \
    pip install --no-cache-dir --no-deps -e .

# WIS2 validator bundles: from WIS2_BUNDLE_DIR mounted at /bundles, else downloaded (compose.yml).
ENV WIS2_PROJECT_DIR=/opt/wis2-chain
CMD ["wis2-chain", "--help"]
