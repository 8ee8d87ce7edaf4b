#!/usr/bin/env python3
"""Capture reference residual-stream activations with Hugging Face transformers.

Run with the venv python ($HOME/.cache/avbridge/pyenv/bin/python), which has
torch, transformers, gguf and sentencepiece:

    nice -n 19 ~/.cache/avbridge/pyenv/bin/python tests/scripts/capture_reference.py \
        --model smollm2-135m-instruct --layer 20 \
        --corpus tests/fixtures/corpus/wiki_en_sentences.jsonl \
        --out ~/.cache/avbridge/captures [--limit N] [--threads 1]

The GGUF is read from <cache>/models/<model>/*.gguf (see fetch_models.py) and
dequantised to float32 by transformers.  For every corpus row (texts are
tokenised one at a time with the tokenizer's default add_special_tokens, and
truncated to the first 64 tokens; batch 1, so no padding) it records the
residual stream at the OUTPUT of decoder block K (0-based), i.e.
`hidden_states[K + 1]` of `output_hidden_states=True`:

  <out>/<model>_L<K>_mean.npy   float32 [n, d]  mean over all token positions
                                                (BOS included when added)
  <out>/<model>_L<K>_last.npy   float32 [n, d]  vector at the last token
  <out>/<model>_L<K>.json       metadata: model, gguf sha256, K, n, corpus file
                                and sha256, row ids, token counts and token ids
                                per row, library versions, sanity statistics

When the corpus file name is not the default wiki corpus, its stem is added to
the output names: <model>_L<K>_<corpus-stem>_{mean,last}.npy / .json.
The residual at block K's output is cross-checked against a forward hook on
that block for the first row.  A next-token NLL on the first rows (default 32)
is recorded as a sanity check that the dequantised model is sane.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

MAX_TOKENS = 64
DEFAULT_CORPUS_STEM = "wiki_en_sentences"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def default_cache() -> Path:
    env = os.environ.get("AVB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "avbridge"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="artefact name, e.g. smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, required=True, help="K: 0-based decoder block index")
    ap.add_argument("--corpus", type=Path, required=True, help="JSONL with 'id' and 'text'")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--nll-rows", type=int, default=32,
                    help="rows on which to compute the next-token NLL sanity check")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    model_dir = (args.cache or default_cache()).expanduser() / "models" / args.model
    ggufs = sorted(model_dir.glob("*.gguf"))
    if len(ggufs) != 1:
        sys.exit(f"error: expected one .gguf in {model_dir}, found {[p.name for p in ggufs]}; "
                 f"run tests/scripts/fetch_models.py {args.model}")
    gguf = ggufs[0]

    rows = []
    with open(args.corpus, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    if args.limit is not None:
        rows = rows[: args.limit]
    if not rows:
        sys.exit(f"error: no rows in {args.corpus}")

    stem = args.corpus.stem
    tag = f"{args.model}_L{args.layer}" + ("" if stem == DEFAULT_CORPUS_STEM else f"_{stem}")
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), gguf_file=gguf.name, dtype=torch.float32,
        attn_implementation="eager")
    model.eval()
    t_load = time.time() - t0
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    if not 0 <= args.layer < n_layers:
        sys.exit(f"error: --layer {args.layer} out of range; {args.model} has {n_layers} blocks")
    if args.layer == n_layers - 1:
        print("warning: hidden_states[-1] is taken after the final norm in HF; "
              "block K=L-1 output is NOT the raw residual", file=sys.stderr)
    d = cfg.hidden_size
    print(f"{args.model}: {type(model).__name__}, {n_layers} blocks, d={d}, "
          f"vocab={cfg.vocab_size}, loaded in {t_load:.1f}s", file=sys.stderr)

    # Forward hook on block K, to cross-check hidden_states[K + 1].
    layers = model.model.layers
    hooked: list = []

    def hook(_mod, _inp, out):
        hooked.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    handle = layers[args.layer].register_forward_hook(hook)

    means = np.zeros((len(rows), d), dtype=np.float32)
    lasts = np.zeros((len(rows), d), dtype=np.float32)
    n_tokens: list[int] = []
    token_ids: list[list[int]] = []
    nlls: list[float] = []
    hook_max_diff = None
    t1 = time.time()
    with torch.inference_mode():
        for i, row in enumerate(rows):
            enc = tok(row["text"], truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            ids = enc["input_ids"]
            want_nll = i < args.nll_rows and ids.shape[1] > 1
            hooked.clear()
            if want_nll:
                out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
                logits = out.logits[0, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
                nlls.append(nll)
            else:
                out = model.model(input_ids=ids, output_hidden_states=True, use_cache=False)
            hs = out.hidden_states
            if len(hs) != n_layers + 1:
                sys.exit(f"error: got {len(hs)} hidden states, expected {n_layers + 1}")
            h = hs[args.layer + 1][0].float()  # [T, d]
            if i == 0:
                if len(hooked) != 1:
                    sys.exit(f"error: hook on block {args.layer} fired {len(hooked)} times")
                hook_max_diff = (hooked[0][0].float() - h).abs().max().item()
                if hook_max_diff > 1e-5 * max(1.0, h.abs().max().item()):
                    sys.exit(f"error: hidden_states[{args.layer + 1}] differs from block "
                             f"{args.layer}'s output by {hook_max_diff}")
            means[i] = h.mean(dim=0).numpy()
            lasts[i] = h[-1].numpy()
            n_tokens.append(int(ids.shape[1]))
            token_ids.append([int(t) for t in ids[0]])
            if (i + 1) % 100 == 0 or i + 1 == len(rows):
                el = time.time() - t1
                print(f"  {i + 1}/{len(rows)}  {el:.0f}s  ({el / (i + 1):.3f}s/row)",
                      file=sys.stderr, flush=True)
    handle.remove()
    t_run = time.time() - t1

    for name, arr in (("mean", means), ("last", lasts)):
        if not np.isfinite(arr).all():
            sys.exit(f"error: non-finite values in the {name} matrix")
    mean_norm = float(np.linalg.norm(means, axis=1).mean())
    last_norm = float(np.linalg.norm(lasts, axis=1).mean())

    np.save(args.out / f"{tag}_mean.npy", means)
    np.save(args.out / f"{tag}_last.npy", lasts)
    bos = getattr(tok, "bos_token_id", None)
    meta = {
        "model": args.model,
        "gguf_file": gguf.name,
        "gguf_sha256": sha256_file(gguf),
        "architecture": type(model).__name__,
        "num_blocks": n_layers,
        "d_model": d,
        "layer": args.layer,
        "site": "residual stream at the output of decoder block `layer` (0-based) = "
                "hidden_states[layer + 1]",
        "n": len(rows),
        "corpus_file": args.corpus.name,
        "corpus_sha256": sha256_file(args.corpus),
        "limit": args.limit,
        "max_tokens": MAX_TOKENS,
        "add_special_tokens": "tokenizer default",
        "bos_token_id": bos,
        "bos_prepended": bool(token_ids and bos is not None and token_ids[0][0] == bos),
        "dtype": "float32",
        "attn_implementation": "eager",
        "files": {"mean": f"{tag}_mean.npy", "last": f"{tag}_last.npy"},
        "ids": [r["id"] for r in rows],
        "n_tokens": n_tokens,
        "token_ids": token_ids,
        "stats": {
            "mean_row_norm_mean": mean_norm,
            "mean_row_norm_last": last_norm,
            "hook_check_max_abs_diff": hook_max_diff,
            "nll_rows": len(nlls),
            "nll_mean": (sum(nlls) / len(nlls)) if nlls else None,
            "load_seconds": round(t_load, 1),
            "run_seconds": round(t_run, 1),
            "torch_threads": args.threads,
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "gguf": _version("gguf"),
            "tokenizers": _version("tokenizers"),
        },
    }
    with open(args.out / f"{tag}.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"{args.out / tag}_{{mean,last}}.npy  shape [{len(rows)}, {d}]  "
          f"mean row norm: mean-pool {mean_norm:.3f}, last-token {last_norm:.3f}  "
          f"nll({len(nlls)} rows) {meta['stats']['nll_mean']}  "
          f"tokens/row {sum(n_tokens) / len(n_tokens):.1f}  "
          f"load {t_load:.0f}s run {t_run:.0f}s")
    return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
