# Stand-in of redis:7.4.1-bookworm: Debian bookworm's redis-server (7.0) and redis-cli; data in
# /data (the working directory, as in the official image).
FROM wis2-standin/debian:bookworm
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data
WORKDIR /data
VOLUME /data
EXPOSE 6379
CMD ["redis-server"]
