#!/usr/bin/env python3
"""Tiny random-weight decoders of each family plus their transformers outputs, as golden fixtures.

Run with the venv python that has torch and transformers:

    ~/.cache/avbridge/pyenv/bin/python tests/scripts/make_tiny_models.py [--out tests/fixtures/tiny]

For each family (qwen2, llama, gemma3) it writes <out>/<family>/:
  config.json, model.safetensors   a transformers model with seeded random weights, saved in float32
  golden.safetensors               what transformers computes in float32 (eager attention):
      input_ids [B, T] (int64), attention_mask [B, T] (left padding: row 1 is shorter),
      logits [B, T, V], hidden_K [B, T, D] = hidden_states[K + 1] (output of block K),
      inject_logits [1, T, V]: the first row with inputs_embeds rows at `inject_positions` replaced by
      `inject_vectors` (for Gemma the replaced rows are NOT multiplied by sqrt(hidden_size)),
      greedy_<i> [n_new] for each prompt i, a greedy continuation of that prompt run alone (no padding).
  golden.json                      K, inject positions, library versions

The configs keep the real families' shapes in miniature: grouped-query attention, Qwen2's q/k/v biases, Llama-3
rope scaling, Gemma-3's local/global layers with their own RoPE bases, a sliding window shorter than the
sequence, query_pre_attn_scalar != head_dim, q/k norms and the sandwich norms. The weights are scaled up from the
default init so that the attention patterns are not uniform and the tests can see mistakes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

VOCAB = 384
SEQ = 24
LAYER_K = 2
N_NEW = 12
SEED = 1234

CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24,
        max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    ),
}

MODEL_CLASSES = {
    "qwen2": transformers.Qwen2ForCausalLM,
    "llama": transformers.LlamaForCausalLM,
    "gemma3": transformers.Gemma3ForCausalLM,
}


def make(family: str, out: Path) -> None:
    torch.manual_seed(SEED)
    config = CONFIGS[family]()
    config._attn_implementation = "eager"
    model = MODEL_CLASSES[family](config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                # Non-trivial norm weights (Gemma's are stored as w with (1 + w) applied).
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if family == "gemma3" else 1.0))
            elif p.dim() == 2:
                p.copy_(torch.randn_like(p) * (1.5 / p.shape[-1] ** 0.5))
            else:  # biases
                p.copy_(torch.randn_like(p) * 0.5)
    d = config.hidden_size
    fdir = out / family
    fdir.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous() for n, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, fdir / "model.safetensors", metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg.pop("_attn_implementation_autoset", None)
    (fdir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=gen)
    short = SEQ - 7
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, : SEQ - short] = 0
    ids[1, : SEQ - short] = config.pad_token_id
    with torch.no_grad():
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        outs = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
        logits = outs.logits
        hidden_k = outs.hidden_states[LAYER_K + 1]

        inject_positions = [3, 9]
        inject_vectors = torch.randn(len(inject_positions), d, generator=gen) * 4.0
        embeds = model.get_input_embeddings()(ids[:1]).clone()
        for row, pos in enumerate(inject_positions):
            embeds[0, pos] = inject_vectors[row]
        inject_logits = model(inputs_embeds=embeds).logits

        greedy = {}
        prompts = [ids[0, :10], ids[1, SEQ - short :], ids[0, 5:9]]
        for i, prompt in enumerate(prompts):
            seq = prompt.clone()[None]
            for _ in range(N_NEW):
                nxt = model(input_ids=seq).logits[0, -1].argmax()
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            greedy[f"greedy_{i}"] = seq[0, prompt.numel():].clone()
            greedy[f"prompt_{i}"] = prompt.clone()

    golden = {
        "input_ids": ids, "attention_mask": mask, "logits": logits, "hidden_K": hidden_k,
        "inject_vectors": inject_vectors, "inject_logits": inject_logits, **greedy,
    }
    save_file({k: v.contiguous() for k, v in golden.items()}, fdir / "golden.safetensors")
    meta = {
        "family": family, "layer_k": LAYER_K, "inject_positions": inject_positions, "n_new": N_NEW,
        "prompts": len(prompts), "torch": torch.__version__, "transformers": transformers.__version__,
        "attention": "eager", "dtype": "float32",
    }
    (fdir / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{family}: {sum(p.numel() for p in model.parameters())} parameters -> {fdir}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "fixtures" / "tiny")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for family in CONFIGS:
        make(family, args.out)


if __name__ == "__main__":
    main()
