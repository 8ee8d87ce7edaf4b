#!/usr/bin/env bash
# Browser end-to-end test, from the sources: build the wasm crate into pkg/ (cargo + wasm-bindgen, no downloaded
# binaries), pack SmolLM2-135M-Instruct as a q8 web bundle, record the native CLI's greedy tokens on that bundle,
# then drive Debian's Chromium (WebGPU on SwiftShader) through web/tests/e2e.mjs: the browser's streamed tokens
# must equal the native ones; without --enable-unsafe-webgpu the page must say WebGPU is missing.
# Needs: rustup target wasm32-unknown-unknown, wasm-bindgen-cli (the version in Cargo.lock), chromium, node.
#   bash web/tests/run-e2e.sh [TOKENS]      (screenshots and logs land in $AVB_E2E_OUT, default ./e2e-out)
set -euo pipefail
cd "$(dirname "$0")/../.."
tokens="${1:-32}"
out="${AVB_E2E_OUT:-$PWD/e2e-out}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/avbridge/target}"
prompt="Write a short story about a robot who learns to paint."

cargo build -p avb-web --target wasm32-unknown-unknown --release
wasm-bindgen --target web --out-dir pkg "$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/avb_web.wasm"
# The avb binary of the README test build (a plain `cargo build -p avb-cli` resolves features differently).
cargo test --workspace --no-run
avb="$CARGO_TARGET_DIR/debug/avb"

(cd web && npm install --no-audit --no-fund --silent)
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$out"
cp -r pkg web "$root/"
"$avb" pack-web --model smollm2-135m-instruct -o "$root/smollm2-q8"
"$avb" generate --model "$root/smollm2-q8" --precision q8 --chat --prompt "$prompt" --max-new-tokens "$tokens" --json \
  | python3 -c "import json, sys; d = json.load(sys.stdin); d['prompt'] = sys.argv[1]; json.dump(d, sys.stdout)" "$prompt" \
  > "$root/expected.json"
node web/tests/e2e.mjs "$root" smollm2-q8 "$root/expected.json" "$out/webgpu.png" | tee "$out/webgpu.log"
node web/tests/e2e.mjs "$root" smollm2-q8 "$root/expected.json" "$out/no-webgpu.png" --no-webgpu | tee "$out/no-webgpu.log"

# The demo feature page: a Qwen2.5-Coder feature (the embedded demo's first topic direction) explained by
# SmolLM2's zero-shot verbalizer through the demo's ridge map and washout, in the <av-explain> widget.
"$avb" demo --source qwen --target smollm2 --out "$root/demo" > /dev/null
python3 - "$root/demo" "$root/web/demo/feature.json" <<'PY'
import json, sys
import numpy as np
demo, out = sys.argv[1], sys.argv[2]
rows = np.load(f"{demo}/topics_source.npy")
labels = json.load(open(f"{demo}/topics_source.labels.json"))
json.dump({"id": 0, "label": labels[0], "model": "qwen2.5-coder-0.5b-instruct", "layer": 16,
           "direction": [float(v) for v in rows[0]]}, open(out, "w"))
PY
cp "$root/demo/map.safetensors" "$root/demo/washout.safetensors" "$root/web/demo/"
ln -s "$root/smollm2-q8" "$root/web/demo/bundle"
node web/tests/widget-smoke.mjs "$root" "$out/demo-page.png" | tee "$out/demo-page.log"
