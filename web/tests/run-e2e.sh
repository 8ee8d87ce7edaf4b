#!/usr/bin/env bash
# Browser end-to-end test, from the sources. Builds pkg/ (web/build-pkg.sh), packs SmolLM2-135M-Instruct as a q8
# web bundle, builds a feature site with `avb site build` from the embedded demo's Qwen2.5-Coder topic directions
# (each page's row read from the direction file by HTTP range), ridge map and washout (qwen -> smollm2), serves it
# with `avb site serve` on 127.0.0.1, and drives Debian's Chromium
# (WebGPU on SwiftShader) through web/tests/site-e2e.mjs: a click on Explain must stream the same greedy explanation
# as `avb explain` on the same bundle; without WebGPU the page must say so; a map into another model's space must be
# refused.
# Needs: the README test build (its avb binary), chromium, node; web/build-pkg.sh installs the rest.
#   bash web/tests/run-e2e.sh        (screenshots and logs land in $AVB_E2E_OUT, default ./e2e-out;
#                                    AVB_WASM_OPT=1 tests the wasm-opt -Oz build of pkg/)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${AVB_E2E_OUT:-$PWD/e2e-out}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/avbridge/target}"
# Feature 4 ("Mathematics") under cross-washout at w = 0.5 is the demo's longest explanation: 33 greedy tokens that
# end on the stop token, so the comparison covers a whole explanation of more than 32 tokens.
feature=4
weight=0.5
budget=40

bash web/build-pkg.sh ${AVB_WASM_OPT:+--wasm-opt}
avb="$CARGO_TARGET_DIR/debug/avb"
if [ ! -x "$avb" ]; then
  # The binary of the README test build (a plain `cargo build -p avb-cli` resolves burn's features differently).
  cargo test --workspace --no-run
fi
# binaryen (optional, ~100 MB) only when the test covers the wasm-opt build.
npm_omit="--omit=optional"
if [ -n "${AVB_WASM_OPT:-}" ]; then npm_omit=""; fi
(cd web && npm ci --no-audit --no-fund --silent $npm_omit)

root="$(mktemp -d)"
server=""
trap '[ -n "$server" ] && kill "$server"; rm -rf "$root"' EXIT
mkdir -p "$out"
"$avb" pack-web --model smollm2-135m-instruct -o "$root/smollm2-q8"
"$avb" demo --source qwen --target smollm2 --out "$root/demo" > /dev/null
demo="$root/demo"
"$avb" site build --bundle "$root/smollm2-q8" --features "$demo/topics_source.npy" --map "$demo/map.safetensors" \
  --washout "$demo/washout.safetensors" --washout-weight "$weight" --max-tokens "$budget" --rows range \
  --title "Qwen2.5-Coder-0.5B topics, explained by SmolLM2-135M" -o "$root/site"
"$avb" explain --features "$demo/topics_source.npy" --ids "$feature" --conditions cross-washout \
  --target-av "$root/smollm2-q8" --map "$demo/map.safetensors" --washout "$demo/washout.safetensors" \
  --washout-weights "$weight" --max-new-tokens "$budget" --precision q8 -o "$root/expected.jsonl"

# A map into Gemma-3-270M's space, for the page's map/verbalizer mismatch check.
"$avb" demo --source qwen --target gemma --out "$root/demo-gemma" > /dev/null
cp "$root/demo-gemma/map.safetensors" "$root/site/artifacts/gemma-map.safetensors"

"$avb" site serve "$root/site" --port 0 > "$root/serve.log" &
server=$!
for _ in $(seq 50); do grep -q http "$root/serve.log" && break; sleep 0.2; done
url="$(grep -o 'http://[0-9.:]*/' "$root/serve.log")"
node web/tests/site-e2e.mjs "$url" "features/feature-$feature.html" "$root/expected.jsonl" "$out" \
  ../artifacts/gemma-map.safetensors | tee "$out/site-e2e.log"
