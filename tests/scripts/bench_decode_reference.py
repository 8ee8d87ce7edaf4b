#!/usr/bin/env python3
"""Reference side of `avb bench decode`: Hugging Face transformers generating with random weights of a real shape.

The model is built from a config in crates/avb-runtime/shapes.json (or a real model's config.json), random weights
made on the device, greedy (or, with --temperature, sampled) `generate` with exactly NEW new tokens after a random PROMPT-token prompt, for each
batch size. Prints one JSON object: per batch, the prefill time (one forward over the prompt), the generate time,
tokens/s (batch * new / generate time) and explanations/s (batch / generate time), plus versions and the device.

Usage: bench_decode_reference.py SHAPES.json NAME --batch 1,16,64 --prompt 128 --new 128 [--device cuda]
       [--dtype bf16|f32] [--reps 3] [--threads N] [--temperature T --top-p P]
"""
import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


def config_for(body):
    body = dict(body)
    body.pop("_comment", None)
    model_type = body.pop("model_type")
    return AutoConfig.for_model(model_type, **body)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes")
    ap.add_argument("name")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    # 0: greedy; else sampling at this temperature with nucleus top-p (and no top-k, which generate adds by default).
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with open(a.shapes) as f:
        shapes = json.load(f)
    body = shapes[a.name] if a.name in shapes else shapes
    config = config_for(body)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    results = []
    for batch in [int(b) for b in a.batch.split(",")]:
        ids = torch.randint(0, config.vocab_size, (batch, a.prompt), device=a.device)
        mask = torch.ones_like(ids)
        kwargs = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0)
        if a.temperature > 0:
            kwargs.update(do_sample=True, temperature=a.temperature, top_p=a.top_p, top_k=0)
        with torch.inference_mode():
            # A whole generation first: after a 4-token warm-up the first 128-token generate took 7.7 s on the
            # H200 (Qwen2.5-7B shape, batch 1 and 64), the next ones 2.4-2.5 s.
            model.generate(ids, attention_mask=mask, **kwargs)
            prefill, total = [], []
            for _ in range(a.reps):
                sync(a.device)
                t = time.perf_counter()
                model(ids, attention_mask=mask)
                sync(a.device)
                prefill.append(time.perf_counter() - t)
                t = time.perf_counter()
                out = model.generate(ids, attention_mask=mask, **kwargs)
                sync(a.device)
                total.append(time.perf_counter() - t)
                assert out.shape[1] == a.prompt + a.new, out.shape
        gen_s = statistics.median(total)
        results.append({
            "batch": batch,
            "prefill_s": statistics.median(prefill),
            "generate_s": gen_s,
            "tokens_per_s": batch * a.new / gen_s,
            "explanations_per_s": batch / gen_s,
            "times_s": total,
        })
    print(json.dumps({
        "name": a.name, "params": params, "dtype": a.dtype, "device": a.device,
        "device_name": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(), "prompt": a.prompt, "new": a.new, "results": results,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }))


if __name__ == "__main__":
    main()
