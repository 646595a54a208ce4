#!/usr/bin/env bash
# The main job, end to end: set up .venv, export the default language model (once), serve it,
# and stream generated text from it with the client.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN=.venv/bin
MODEL=docs-lstm
if ! ls models/$MODEL/*/manifest.json >/dev/null 2>&1; then
  echo "==> training and exporting the default model (1,500 steps: about 5 minutes on 2 idle cores)"
  $BIN/seqserve export lm --corpus docs --name $MODEL --out models
else
  echo "==> models/$MODEL already exported (delete it to train again)"
fi
log=$(mktemp)
echo "==> starting the server"
$BIN/seqserve serve --models models --host 127.0.0.1 --port 0 >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do
  addr=$(grep -o 'listening on [^ ]*' "$log" | head -1 | cut -d' ' -f3 || true)
  [ -n "$addr" ] && break
  kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.2
done
[ -n "$addr" ] || { echo "server did not start"; cat "$log"; exit 1; }
echo "==> server listening on $addr"
$BIN/seqserve client --target "$addr" models
echo "==> streaming generated text:"
$BIN/seqserve client --target "$addr" generate $MODEL "The with statement" --max-tokens 300 --temperature 0.6 --seed 7
echo
echo "==> done; stopping the server"
