# Stand-in of python:3.11.11-slim-bookworm: Debian bookworm's Python 3.11 in a virtual environment
# at /usr/local (python, pip in /usr/local/bin, as the official image has them).
FROM wis2-standin/debian:bookworm
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /usr/local \
    && ln -sf python3 /usr/local/bin/python
CMD ["python3"]
