#!/usr/bin/env python3
"""Regenerate tests/fixtures/golden/top_p.json: the tokens Hugging Face transformers' TemperatureLogitsWarper and
TopPLogitsWarper keep (float64) for seeded logits, the reference for avb-runtime's nucleus (src/sample.rs).

Run: python3 tests/scripts/make_top_p_golden.py   (needs numpy, torch, transformers)
Logits are float32 values (written exactly); cases run from flat to peaked, over temperatures and top-p values.
Continuous random values: no ties at the nucleus's edge, where torch's unstable sort leaves the order open.
"""
import json
import pathlib

import numpy as np
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "top_p.json"


def main():
    rng = np.random.default_rng(20261201)
    cases = []
    for vocab, spread, temperature, top_p in [
        (1500, 0.3, 1.0, 0.9),
        (1500, 1.0, 0.7, 0.9),
        (1500, 3.0, 0.7, 0.9),
        (1500, 8.0, 1.0, 0.95),
        (1200, 2.0, 1.3, 0.5),
        (1200, 2.0, 0.5, 0.05),
        (900, 4.0, 1.0, 1.0),
        (900, 1.0, 2.0, 0.99),
    ]:
        logits = (rng.standard_normal(vocab) * spread).astype(np.float32)
        scores = torch.tensor(logits.astype(np.float64))[None, :]
        scores = TemperatureLogitsWarper(temperature)(None, scores)
        scores = TopPLogitsWarper(top_p)(None, scores)
        kept = torch.nonzero(scores[0] != -float("inf")).flatten().tolist()
        cases.append(
            {
                "temperature": temperature,
                "top_p": top_p,
                "logits": [float(v) for v in logits],
                "kept": kept,
            }
        )
    OUT.write_text(json.dumps(cases) + "\n")
    print(f"wrote {OUT}: {len(cases)} cases, kept {[len(c['kept']) for c in cases]}")


if __name__ == "__main__":
    main()
