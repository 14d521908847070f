# Stand-in of prefecthq/prefect:3.9.1-python3.11: Prefect 3.9.1 from PyPI on the python stand-in.
# Behind a TLS-intercepting proxy, pip gets the proxy's CA as the build secret `proxy_ca`.
FROM python:3.11.11-slim-bookworm
RUN --mount=type=secret,id=proxy_ca \
    if [ -s /run/secrets/proxy_ca ]; then export PIP_CERT=/run/secrets/proxy_ca; fi; \
    pip install --no-cache-dir prefect==3.9.1
CMD ["prefect", "version"]
