#!/usr/bin/env bash
# The long fuzz run: schemathesis over every route of `loraserve serve` on the demo, with the
# admin key and then the user key, for MAX_TIME seconds each (default 600), checking that no
# answer is a 5xx and every answer has a documented status, content type and shape. The
# suite's tests/server/test_openapi.py runs the same for about 15 seconds a key.
#
#   bash benchmarks/fuzz.sh                 # OUT=benchmarks/results/fuzz-<date>
#   MAX_TIME=60 SEED=7 bash benchmarks/fuzz.sh
#
# Each key's run writes a JUnit report into $OUT; a failure prints the request that caused
# it, with a curl line to replay it. Exits non-zero if either run found anything.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MAX_TIME=${MAX_TIME:-600}
SEED=${SEED:-$RANDOM}
PORT=${PORT:-8475}
OUT=${OUT:-benchmarks/results/fuzz-$(date +%Y%m%d-%H%M%S)}
USER_KEY=fuzz-user ADMIN_KEY=fuzz-admin
mkdir -p "$OUT/root" "$OUT/export"
cp -r examples/demo/adapters/upper "$OUT/root/upper"

"$PY" -m server.cli --log-level WARNING serve --port "$PORT" --no-access-log \
  --api-key "$USER_KEY" --admin-api-key "$ADMIN_KEY" --adapter-root "$OUT/root" \
  --export-root "$OUT/export" --max-compose-steps 4 >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 1
done

STATUS=0
for key in "$ADMIN_KEY" "$USER_KEY"; do
  echo "== fuzzing with the ${key#fuzz-} key for up to ${MAX_TIME}s (seed $SEED)"
  "$PY" -m schemathesis.cli run "http://127.0.0.1:$PORT/openapi.json" \
    --header "Authorization: Bearer $key" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --max-time "$MAX_TIME" --seed "$SEED" --generation-database none --workers 1 \
    --report junit --report-dir "$OUT/${key#fuzz-}" || STATUS=1
done
# What a good request gets afterwards.
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H "Authorization: Bearer $USER_KEY" \
  -H "Content-Type: application/json" \
  -d '{"model": "loraserve-demo", "prompt": "fine=", "max_tokens": 8, "temperature": 0}' ||
  STATUS=1
echo
echo "== results in $OUT (exit $STATUS)"
exit $STATUS
