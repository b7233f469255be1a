#!/usr/bin/env bash
# Service benchmarks on PostgreSQL (127.0.0.1:5432), release build, loopback only:
#  1. GET /jobs/{id} requests/s and latency percentiles under wrk (2 threads, 32 connections, 15 s),
#     each request authenticated by its API key (the per-key rate limit is off for the run);
#  2. a 1 GiB streamed upload: MB/s and the server's peak RSS (VmHWM) before and after;
#  3. queue pick-up latency: job created_at -> started_at with one in-process worker (Postgres NOTIFY).
# Usage: bench/service.sh   (needs `apt-get install wrk jq`; scripts/setup-python.sh run once)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/shrink-target}
command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null
command -v jq >/dev/null || apt-get install -y -qq jq >/dev/null
cargo build --release --quiet --bin shrink
BIN=$CARGO_TARGET_DIR/release/shrink
[ -f fixtures-out/reference.json ] || .venv/bin/python -W ignore scripts/make_fixtures.py fixtures-out >/dev/null

DB=shrink_bench_$$
psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE $DB" postgres
WORK=$(mktemp -d)
PORT=18080
export SHRINK_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB SHRINK_DATA_DIR=$WORK/data SHRINK_BIND=127.0.0.1:$PORT \
  SHRINK_MAX_UPLOAD_BYTES=$((2 * 1024 * 1024 * 1024)) SHRINK_LOG=warn SHRINK_RATE_LIMIT_PER_SECOND=0
$BIN serve --workers 1 & PID=$!
cleanup() { kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$WORK"; psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB" postgres || true; }
trap cleanup EXIT
URL=http://127.0.0.1:$PORT
for _ in $(seq 1 100); do curl -sf $URL/healthz >/dev/null && break; sleep 0.1; done
AUTH="Authorization: Bearer $(cat $WORK/data/admin.key)"
curl() { command curl -H "$AUTH" "$@"; }

MODEL=$(curl -sf -T fixtures-out/two_input.onnx -X POST -H 'content-type: application/octet-stream' "$URL/models" | jq -r .id)
DATA=$(curl -sf -T fixtures-out/two_input.npz -X POST -H 'content-type: application/octet-stream' "$URL/datasets" | jq -r .id)
spec() { echo "{\"model_id\":\"$MODEL\",\"dataset_id\":\"$DATA\",\"pipeline\":[{\"stage\":\"evaluate\",\"latency_runs\":2,\"warmup_runs\":0}]}"; }

echo "== 3. queue pick-up latency (20 jobs, one at a time, one worker, Postgres NOTIFY)"
lat=()
for i in $(seq 1 20); do
  J=$(curl -sf -H 'content-type: application/json' -d "$(spec)" $URL/jobs | jq -r .id)
  while [ "$(curl -sf $URL/jobs/$J | jq -r .status)" != succeeded ]; do sleep 0.05; done
  lat+=("$(psql -qtA -h 127.0.0.1 -U postgres -d $DB -c "SELECT started_at - created_at FROM jobs WHERE id = '$J'")")
done
printf '%s\n' "${lat[@]}" | sort -n | awk '{a[NR]=$1} END {printf "pick-up latency ms: min %d, median %d, p95 %d, max %d (n=%d)\n", a[1], a[int((NR+1)/2)], a[int(NR*0.95+0.5)], a[NR], NR}'

echo "== 1. GET /jobs/{id} under wrk (2 threads, 32 connections, 15 s, server on the same 2 cores)"
wrk -t2 -c32 -d15s --latency -H "$AUTH" "$URL/jobs/$J" | grep -E "Requests/sec|Latency|50%|90%|99%"

echo "== 2. 1 GiB streamed upload"
.venv/bin/python -c "
import numpy as np
np.savez('$WORK/big.npz', input=np.ones((4 * 1024 * 1024, 64), np.float32))"
SIZE=$(stat -c %s $WORK/big.npz)
hwm() { awk '/VmHWM/ {print $2}' /proc/$PID/status; }
echo "server VmHWM before: $(hwm) kB"
START=$(date +%s.%N)
curl -sf -T $WORK/big.npz -X POST -H 'content-type: application/octet-stream' "$URL/datasets?name=big.npz" | jq -c '{samples, size_bytes}'
END=$(date +%s.%N)
echo "server VmHWM after:  $(hwm) kB"
awk -v s=$SIZE -v a=$START -v b=$END 'BEGIN {printf "uploaded %d bytes in %.2f s = %.1f MB/s\n", s, b-a, s/(b-a)/1e6}'
