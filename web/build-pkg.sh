#!/usr/bin/env bash
# Build the browser runtime into pkg/ from the sources: crates/avb-web for wasm32 (release), then wasm-bindgen
# (the version Cargo.lock pins, installed with cargo when missing). No prebuilt binaries are downloaded.
#   bash web/build-pkg.sh
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
ls -l pkg/avb_web_bg.wasm
