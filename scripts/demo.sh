#!/usr/bin/env bash
# The main job end to end on the bundled real data: train a small Rectified LpJEPA encoder on Fashion-MNIST,
# evaluate it, export it to ONNX (parity-checked), calibrate OOD scoring, index the test split, search it, then
# serve it over HTTP on loopback and exercise every kind of request once.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/demo}
OUT=${OUT:-artifacts/demo}
PORT=${PORT:-8765}
CONFIG=${CONFIG:-smoke}
mkdir -p "$OUT"

echo "== 1/6 train ($CONFIG) -> $RUN"
lpjepa train --config "$CONFIG" --out "$RUN" --force
echo "== 2/6 evaluate on fashion-mnist:test"
lpjepa eval "$RUN" --data fashion-mnist:test --max-train 5000 --limit 2000 --no-progress --json | tee "$OUT/eval.json"
echo "== 3/6 export -> $OUT/model.onnx"
lpjepa export "$RUN" --out "$OUT/model.onnx"
echo "== 4/6 OOD calibration on fashion-mnist (train split)"
lpjepa ood calibrate --model "$OUT/model.onnx" --data fashion-mnist --limit 5000
echo "== 5/6 index fashion-mnist:test -> $OUT/index, then search"
rm -rf "$OUT/index"
lpjepa index build --model "$OUT/model.onnx" --data fashion-mnist:test --out "$OUT/index"
python - "$OUT" <<'PY'
import sys
from data.sources import open_source
fashion = open_source("fashion-mnist:test")
fashion[0][0].save(f"{sys.argv[1]}/query.png")      # an indexed image: it finds itself first
fashion[1][0].save(f"{sys.argv[1]}/query-2.png")
open_source("mnist")[0][0].save(f"{sys.argv[1]}/digit.png")  # a handwritten digit: another distribution
PY
lpjepa search --model "$OUT/model.onnx" --index "$OUT/index" --image "$OUT/query.png" -k 5 --json
echo "== 6/6 serve on 127.0.0.1:$PORT"
lpjepa serve --model "$OUT/model.onnx" --index "$OUT/index" --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/readyz"; echo
curl -sf -F "files=@$OUT/query.png" "http://127.0.0.1:$PORT/v1/embed" | head -c 300; echo
curl -sf -F "file=@$OUT/query.png" "http://127.0.0.1:$PORT/v1/search?k=3"; echo
curl -sf -F "files=@$OUT/query.png" "http://127.0.0.1:$PORT/v1/ood"; echo
# The web page's neighbours are the index's thumbnails: every hit must carry one.
curl -sf -F "file=@$OUT/query.png" -F thumbnails=true "http://127.0.0.1:$PORT/v1/search?k=8" | python -c '
import json, sys
hits = json.load(sys.stdin)["results"]
with_thumb = sum(h["thumbnail"] is not None for h in hits)
print(f"{with_thumb}/{len(hits)} neighbours carry a thumbnail")
sys.exit(0 if hits and with_thumb == len(hits) else 1)'
if command -v chromium >/dev/null && command -v chromedriver >/dev/null && python -c "import selenium" 2>/dev/null; then
  echo "== the web page after a search (headless chromium) -> $OUT/web.png"
  python tests/test_serve_web.py --url "http://127.0.0.1:$PORT" --out "$OUT/web.png" \
    "$OUT/query.png" "$OUT/digit.png"
fi
echo "demo done: artifacts in $OUT; run 'make serve' to keep the server up (web page at http://127.0.0.1:8000/)"
