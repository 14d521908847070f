# Stand-in of eclipse-mosquitto:2.0.20: Debian bookworm's mosquitto (2.0.11), user mosquitto with
# uid/gid 1883 as in the official image.
FROM wis2-standin/debian:bookworm
RUN groupadd -r -g 1883 mosquitto \
    && useradd -r -u 1883 -g mosquitto -d /var/lib/mosquitto -s /usr/sbin/nologin mosquitto \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin
EXPOSE 1883
CMD ["mosquitto", "-c", "/etc/mosquitto/mosquitto.conf"]
