#!/usr/bin/env bash
# Install the Debian packages the test-suite runs for real, only when missing.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
[ -x /usr/bin/prometheus-node-exporter ] || need+=(prometheus-node-exporter)
command -v age >/dev/null 2>&1 || need+=(age)
# the backup role's off-host copy, run for real by tests/host (and amtool, which checks the
# rendered Alertmanager config in tests/ansible/test_alertmanager_amtool.py)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v amtool >/dev/null 2>&1 || need+=(prometheus-alertmanager)
# headless browser that opens `qpq-ops report` output in tests/ops/test_report_browser.py
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# initdb/pg_ctl/postgres for the PostgreSQL backend's tests (tests/helpers/postgres.py)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
# nginx with its stream module: the UDP balancer of tests/server/test_nginx_balancer.py
command -v nginx >/dev/null 2>&1 || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
# tests/host: a Debian 12 root with systemd as PID 1 (make test-host).
[ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
echo "installing Debian packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends keeps the install small; the services are not started here.
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts the packaged daemons; tests start their own on free ports.
for svc in prometheus prometheus-node-exporter nginx; do
  (command -v systemctl >/dev/null && $SUDO systemctl stop "$svc" 2>/dev/null) || true
  $SUDO pkill -x "$svc" 2>/dev/null || true
done
# The packaged PostgreSQL cluster is not used (tests run their own on free ports).
if [[ " ${need[*]} " == *" postgresql "* ]]; then
  (command -v systemctl >/dev/null && $SUDO systemctl stop postgresql 2>/dev/null) || true
  (command -v pg_ctlcluster >/dev/null && for c in /etc/postgresql/*/main; do
     [ -d "$c" ] && $SUDO pg_ctlcluster "$(basename "$(dirname "$c")")" main stop 2>/dev/null
   done) || true
fi
