#!/usr/bin/env python3
"""Tiny NLA checkpoints (AV and AR) with real tokenizers and chat templates, plus what a Python
re-implementation of shared/docs/nla-protocol.md computes with transformers on them.

    ~/.cache/avbridge/pyenv/bin/python tests/scripts/make_nla_fixtures.py [--out tests/fixtures/nla]

Writes, under <out>:
  qwen2-av/   Qwen2-shaped random model, byte-level BPE tokenizer trained here, Qwen's ChatML template with its
              default system prompt, placeholder U+320E as an added token, nla_meta.yaml (role av, scale 150)
  gemma3-av/  Gemma-3-shaped model, a tokenizer whose post-processor adds <bos> (so encoding the rendered chat text
              with special tokens would double the BOS), Gemma's turn template, placeholder U+321C, scale 80000
  qwen2-ar/   Qwen2-shaped model + value_head.safetensors, nla_meta.yaml (role ar, K = 2)
  golden.json + golden.safetensors: for each AV the prompt ids, the placeholder sites, the input embeddings with
  the rescaled vector in place (inputs_embeds of the reference), the last-position logits and 8 greedy tokens, and
  the same with the vector patched into the residual stream at the input of block 2 (zero-shot profiles' site);
  for the AR the input ids of three explanations, the predicted vectors, and cosine / nMSE / FVE against gold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
import yaml
from safetensors.torch import save_file
from tokenizers import AddedToken, models, pre_tokenizers, decoders, processors, trainers

SEED = 4321
PATCH_LAYER = 2
VOCAB = 512
AV_TEMPLATE_NOTE = "the NLA default AV template (nla-protocol.md)"
AV_TEMPLATE = (
    "You are a meticulous AI researcher conducting an important investigation into activation vectors from a "
    "language model. Your overall task is to describe the semantic content of that activation vector.\n\n"
    "We will pass the vector enclosed in <concept> tags into your context. You must then produce an explanation "
    "for the vector, enclosed within <explanation> tags. The explanation consists of 2-3 text snippets describing "
    "that vector.\n\nHere is the vector:\n\n<concept>{injection_char}</concept>\n\nPlease provide an explanation."
)
AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
QWEN_CHAT = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GEMMA_CHAT = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (message['content'] | trim) + '<end_of_turn>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)
CORPUS = [
    AV_TEMPLATE, AR_TEMPLATE,
    "The explanation describes news text about war, music, cooking and medicine.",
    "Final token \"the\" predicts a noun. Quoted phrase patterns follow.",
    "You are a helpful assistant. Please provide an explanation of the concept.",
] * 40


# Qwen2's split pattern: transformers loads a qwen2 checkpoint's tokenizer with it whatever tokenizer.json says.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")


def train_tokenizer(specials: list[str], placeholder: str, bos: str | None, qwen_split: bool) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
    if qwen_split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken(placeholder, normalized=False, special=False)])
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def random_model(cls, config, gemma: bool):
    torch.manual_seed(SEED)
    config._attn_implementation = "eager"
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if gemma else 1.0))
            elif p.dim() == 2:
                p.copy_(torch.randn_like(p) * (1.5 / p.shape[-1] ** 0.5))
            else:
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def save_checkpoint(model, config, tok, tok_config: dict, meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous() for n, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg.pop("_attn_implementation_autoset", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    (out / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True, sort_keys=False))


def sidecar(role: str, d: int, layer: int, scale, char: str, tid: int, left: int | None, right: int | None) -> dict:
    return {
        "kind": "nla_model", "schema_version": 2, "role": role, "base_checkpoint": "tiny-random",
        "d_model": d, "extraction_layer_index": layer,
        "extraction": {"injection_scale": scale, "mse_scale": float(d) ** 0.5},
        "tokens": {"injection_char": char, "injection_token_id": tid, "injection_left_neighbor_id": left,
                   "injection_right_neighbor_id": right, "critic_suffix_ids": []},
        "prompt_templates": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE},
        "provenance": {"made_by": "tests/scripts/make_nla_fixtures.py"},
    }


# ---- the reference: nla-protocol.md re-implemented over transformers ----

def ref_av_prompt(tok, meta: dict) -> tuple[list[int], list[int]]:
    text = meta["prompt_templates"]["av"].replace("{injection_char}", meta["tokens"]["injection_char"])
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    t = meta["tokens"]
    sites = [p for p in range(1, len(ids) - 1) if ids[p] == t["injection_token_id"]
             and ids[p - 1] == t["injection_left_neighbor_id"] and ids[p + 1] == t["injection_right_neighbor_id"]]
    return list(ids), sites


def ref_av(model, tok, meta: dict, vector: torch.Tensor, n_new: int) -> dict:
    ids, sites = ref_av_prompt(tok, meta)
    assert len(sites) == 1, sites
    v = vector.float()
    v = v / (v.norm() / float(meta["extraction"]["injection_scale"]))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.tensor([ids])).float().clone()
        embeds[0, sites[0]] = v
        logits = model(inputs_embeds=embeds).logits[0, -1]
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
        # A zero-shot profile's residual patch: the same vector replaces the residual stream at the input of
        # block PATCH_LAYER (a forward pre-hook on that decoder layer), on the ordinary embeddings.
        def patch(_module, args, kwargs):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            if hidden.shape[1] == len(ids):  # the prefill pass only
                hidden[0, sites[0]] = v
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs
        handle = model.model.layers[PATCH_LAYER].register_forward_pre_hook(patch, with_kwargs=True)
        patched_logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        patched = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        handle.remove()
    return {"ids": torch.tensor(ids), "sites": torch.tensor(sites), "inputs_embeds": embeds[0],
            "vector": vector.float(), "last_logits": logits, "greedy": out[0, -n_new:],
            "patched_last_logits": patched_logits, "patched_greedy": patched[0, -n_new:]}


def ref_ar(model, value_head, tok, meta: dict, explanations: list[str], gold: np.ndarray) -> dict:
    k = meta["extraction_layer_index"]
    backbone = model.model
    backbone.layers = backbone.layers[: k + 1]
    backbone.norm = torch.nn.Identity()
    preds, ids_all = [], []
    for e in explanations:
        ids = tok(meta["prompt_templates"]["ar"].replace("{explanation}", e), add_special_tokens=True)["input_ids"]
        ids_all.append(ids)
        with torch.no_grad():
            h = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            preds.append(value_head(h).numpy())
    pred = np.stack(preds).astype(np.float64)
    s = float(meta["extraction"]["mse_scale"])
    pn = pred / np.linalg.norm(pred, axis=1, keepdims=True) * s
    gn = gold / np.linalg.norm(gold, axis=1, keepdims=True) * s
    mse = ((pn - gn) ** 2).mean(axis=1)
    baseline = ((gn.mean(axis=0, keepdims=True) - gn) ** 2).mean(axis=1).mean()
    return {"pred": pred, "cos": (pn * gn).sum(axis=1) / s**2, "nmse": mse, "fve": 1 - mse / baseline,
            "ids": ids_all}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/nla"))
    args = ap.parse_args()
    golden, info = {}, {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__, "n_new": 8, "av": {}, "ar": {}}

    qwen_tok = train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "\u320e", None, True)
    gemma_tok = train_tokenizer(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "\u321c", "<bos>", False)
    families = {
        "qwen2-av": (qwen_tok, "\u320e", 150.0, transformers.Qwen2ForCausalLM, lambda: transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0),
            {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": QWEN_CHAT}),
        "gemma3-av": (gemma_tok, "\u321c", 80000.0, transformers.Gemma3ForCausalLM, lambda: transformers.Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, max_position_embeddings=512,
            rms_norm_eps=1e-6, sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            bos_token_id=2, eos_token_id=1, pad_token_id=0),
            {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
             "chat_template": GEMMA_CHAT}),
    }
    gen = torch.Generator().manual_seed(SEED)
    for name, (tok, char, scale, cls, make_config, tok_config) in families.items():
        config = make_config()
        model = random_model(cls, config, name.startswith("gemma"))
        tid = tok.token_to_id(char)
        out = args.out / name
        save_checkpoint(model, config, tok, tok_config, sidecar("av", 64, 2, scale, char, tid, None, None), out)
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
        # The neighbours as the release records them: from the rendered prompt.
        meta = sidecar("av", 64, 2, scale, char, tid, None, None)
        ids = hf_tok.apply_chat_template([{"role": "user", "content": AV_TEMPLATE.replace("{injection_char}", char)}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)
        p = ids.index(tid)
        meta["tokens"]["injection_left_neighbor_id"] = ids[p - 1]
        meta["tokens"]["injection_right_neighbor_id"] = ids[p + 1]
        (out / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True, sort_keys=False))
        vector = torch.randn(64, generator=gen) * 3.0
        ref = ref_av(model, hf_tok, meta, vector, info["n_new"])
        for k, v in ref.items():
            golden[f"{name}.{k}"] = v.contiguous()
        info["av"][name] = {"n_ids": len(ref["ids"]), "sites": ref["sites"].tolist(),
                            "double_bos_if_encoded_with_specials": len(hf_tok(hf_tok.apply_chat_template(
                                [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False),
                                add_special_tokens=True)["input_ids"]) - len(hf_tok.apply_chat_template(
                                [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=True,
                                return_dict=False))}

    # The AR: a Qwen2-shaped model with a value head, K = 2.
    config = families["qwen2-av"][4]()
    torch.manual_seed(SEED + 7)
    model = random_model(transformers.Qwen2ForCausalLM, config, False)
    value_head = torch.nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        value_head.weight.copy_(torch.randn(64, 64, generator=gen) / 8.0)
    out = args.out / "qwen2-ar"
    meta = sidecar("ar", 64, 2, 150.0, "\u320e", qwen_tok.token_to_id("\u320e"), None, None)
    save_checkpoint(model, config, qwen_tok, families["qwen2-av"][5], meta, out)
    save_file({"weight": value_head.weight.detach().contiguous()}, out / "value_head.safetensors")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    explanations = ["News text about war.\n\nFinal token \"the\"", "Cooking recipes and food.", "Music: a song."]
    gold = torch.randn(3, 64, generator=gen).numpy().astype(np.float64)
    ar = ref_ar(model, value_head, hf_tok, meta, explanations, gold)
    golden["ar.gold"] = torch.tensor(gold, dtype=torch.float32)
    golden["ar.pred"] = torch.tensor(ar["pred"], dtype=torch.float32)
    for k in ("cos", "nmse", "fve"):
        golden[f"ar.{k}"] = torch.tensor(ar[k], dtype=torch.float64)
    info["ar"] = {"explanations": explanations, "ids": ar["ids"]}

    save_file(golden, args.out / "golden.safetensors")
    (args.out / "golden.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in info["av"].items()}, indent=1))


if __name__ == "__main__":
    main()
