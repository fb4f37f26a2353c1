# qpq server image for docker-compose.prod.yml: slim Python, non-root, data on a volume.
# Build: docker build -t qpq-server:local .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Non-root service user; /data is its only writable place (and, for the compose backup
# job, /backups and the metric dir: a new named volume takes this ownership).
RUN groupadd --system --gid 10001 qpq \
 && useradd --system --uid 10001 --gid qpq --home-dir /data --shell /usr/sbin/nologin qpq \
 && mkdir -p /data /backups /var/lib/qpq-backup \
 && chown qpq:qpq /data /backups /var/lib/qpq-backup \
 && chmod 0750 /data /backups && chmod 0755 /var/lib/qpq-backup

WORKDIR /opt/qpq
COPY pyproject.toml README.md ./
COPY qpq_server ./qpq_server
COPY qpq_ops ./qpq_ops
# [fast]: uvloop, the server's event loop when installed (bench/README.md has the figures).
RUN pip install --no-compile '.[fast]' && rm -rf /opt/qpq/build

# First start: `qpq-server init` makes the data dir (TLS, OPAQUE setup, KT key); the
# metrics endpoint then listens on the compose network (it is never published).
# Every start copies the secrets compose mounts as files (QPQ_SECRETS_DIR, default
# /run/secrets: qpq_auth_token, qpq_db_key) into /data/.env, over what init generated;
# they never travel as environment, which `docker inspect` would show.
RUN printf '%s\n' \
  '#!/bin/sh' \
  'set -eu' \
  'cfg="${QPQ_CONFIG:-/data/qpq-server.toml}"' \
  'if [ ! -f "$cfg" ]; then' \
  '  qpq-server init --data-dir "$(dirname "$cfg")" --domain "${QPQ_DOMAIN:-localhost}"' \
  '  python -c "import sys, tomllib, tomli_w; p = sys.argv[1]; c = tomllib.load(open(p, \"rb\")); c.setdefault(\"metrics\", {})[\"listen\"] = \"0.0.0.0:9090\"; open(p, \"wb\").write(tomli_w.dumps(c).encode())" "$cfg"' \
  'fi' \
  'python -c "import os, sys; from pathlib import Path; from qpq_server.secrets import read_env_file, write_env_file; env = Path(sys.argv[1]); src = Path(os.environ.get(\"QPQ_SECRETS_DIR\", \"/run/secrets\")); values = read_env_file(env); given = {n: (src / n.lower()).read_text().strip() for n in (\"QPQ_AUTH_TOKEN\", \"QPQ_DB_KEY\") if (src / n.lower()).is_file()}; values.update({k: v for k, v in given.items() if v}); write_env_file(env, values)" "$(dirname "$cfg")/.env"' \
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
