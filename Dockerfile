# qpq server image for docker-compose.prod.yml: slim Python, non-root, data on a volume.
# Build: docker build -t qpq-server:local .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Non-root service user; /data is its only writable place.
RUN groupadd --system --gid 10001 qpq \
 && useradd --system --uid 10001 --gid qpq --home-dir /data --shell /usr/sbin/nologin qpq \
 && mkdir -p /data && chown qpq:qpq /data && chmod 0750 /data

WORKDIR /opt/qpq
COPY pyproject.toml README.md ./
COPY qpq_server ./qpq_server
COPY qpq_ops ./qpq_ops
# [fast]: uvloop, the server's event loop when installed (bench/README.md has the figures).
RUN pip install --no-compile '.[fast]' && rm -rf /opt/qpq/build

# First start: `qpq-server init` makes the data dir (TLS, OPAQUE setup, KT key); the
# metrics endpoint then listens on the compose network (it is never published).
# Secrets come from the environment (compose passes them from .env) and win over the
# .env file that init writes into /data.
RUN printf '%s\n' \
  '#!/bin/sh' \
  'set -eu' \
  'cfg="${QPQ_CONFIG:-/data/qpq-server.toml}"' \
  'if [ ! -f "$cfg" ]; then' \
  '  qpq-server init --data-dir "$(dirname "$cfg")" --domain "${QPQ_DOMAIN:-localhost}"' \
  '  python -c "import sys, tomllib, tomli_w; p = sys.argv[1]; c = tomllib.load(open(p, \"rb\")); c.setdefault(\"metrics\", {})[\"listen\"] = \"0.0.0.0:9090\"; open(p, \"wb\").write(tomli_w.dumps(c).encode())" "$cfg"' \
  'fi' \
  'qpq-server check-config "$cfg"' \
  'exec qpq-server run --config "$cfg"' \
  > /usr/local/bin/qpq-entrypoint \
 && chmod 0755 /usr/local/bin/qpq-entrypoint

USER qpq:qpq
VOLUME ["/data"]
# QUIC (clients) and federation over UDP; metrics + health over HTTP.
EXPOSE 7000/udp 7001/udp 9090/tcp

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/readyz', timeout=4)"]

ENTRYPOINT ["/usr/local/bin/qpq-entrypoint"]
