#!/usr/bin/env python3
"""Regenerate tests/fixtures/tokenizer/ids.json: token ids that Hugging Face transformers' tokenizers (built from
the GGUF files, as `AutoTokenizer.from_pretrained(dir, gguf_file=...)` does) give for a multilingual test text,
with and without special tokens, and `apply_chat_template` renderings (text and ids) of a few conversations for
the models whose GGUF carries a chat template.

Run with the Python that has torch/transformers/gguf (see tests/scripts/fetch_models.py for the model cache):
    python tests/scripts/make_tokenizer_fixture.py
"""
import json
import os
import pathlib

import transformers
from transformers import AutoTokenizer

CACHE = pathlib.Path(os.environ.get("AVB_CACHE", pathlib.Path.home() / ".cache" / "avbridge")) / "models"
OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer" / "ids.json"
MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder-0.5b-instruct": "Qwen2.5-Coder-0.5B-Instruct.gguf",
    "gemma-3-270m": "gemma-3-270m-q4_k_m.gguf",
}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ils ont été très élégants, n'est-ce pas ? Ça coûte 12,50 €.",
    "Der Straßenbahnfahrer grüßte höflich; 東京タワーは高さ333メートルです。",
    "Москва — столица России. 서울은 한국의 수도입니다. مرحبا بالعالم",
    "  leading spaces,\ttabs\nand new\n\nlines   ",
    "def f(x):\n    return x**2  # 1234567 ✓ 🦀 emoji",
    "<|im_start|>user\nhi<|im_end|> <start_of_turn> <bos>",
]
CHATS = [
    [{"role": "user", "content": "Describe the vector.\n\n<concept>x</concept>"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour ! Ça va ?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
]


def main():
    out = {"transformers": transformers.__version__, "texts": TEXTS, "models": {}}
    for name, gguf in MODELS.items():
        tok = AutoTokenizer.from_pretrained(CACHE / name, gguf_file=gguf)
        rec = {"gguf": gguf, "plain": [tok.encode(t, add_special_tokens=False) for t in TEXTS],
               "special": [tok.encode(t) for t in TEXTS],
               "decoded": [tok.decode(tok.encode(t, add_special_tokens=False)) for t in TEXTS]}
        if tok.chat_template:
            rec["chat"] = [{"messages": m,
                            "text": tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                            "ids": list(tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True, return_dict=False))}
                           for m in CHATS]
        out["models"][name] = rec
        print(name, [len(x) for x in rec["plain"]])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
