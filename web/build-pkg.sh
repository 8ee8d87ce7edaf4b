#!/usr/bin/env bash
# Build the browser runtime into pkg/ from the sources: crates/avb-web for wasm32 (release), then wasm-bindgen
# (the version Cargo.lock pins, installed with cargo when missing), then with --wasm-opt binaryen's wasm-opt -Oz
# (the npm package in web/package.json; about 4.5 minutes here, so tests skip it). No prebuilt native binaries
# are downloaded.
#   bash web/build-pkg.sh [--wasm-opt]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/avbridge/target}"
version="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)"
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$version" ]; then
  cargo install wasm-bindgen-cli --version "=$version"
fi
rustup target add wasm32-unknown-unknown >/dev/null
cargo build -p avb-web --target wasm32-unknown-unknown --release
wasm-bindgen --target web --out-dir pkg "$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/avb_web.wasm"
if [ "${1:-}" = "--wasm-opt" ]; then
  (cd web && npm ci --no-audit --no-fund --silent)
  # The features rustc's wasm32 target emits; wasm-opt refuses a module that uses one it was not told about.
  web/node_modules/.bin/wasm-opt -Oz --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
    --enable-mutable-globals pkg/avb_web_bg.wasm -o pkg/avb_web_bg.opt.wasm
  mv pkg/avb_web_bg.opt.wasm pkg/avb_web_bg.wasm
fi
ls -l pkg/avb_web_bg.wasm
