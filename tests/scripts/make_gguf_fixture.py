#!/usr/bin/env python3
"""Regenerate tests/fixtures/gguf/: a small GGUF v3 file with one tensor of every supported type and metadata of
every value type, plus the reference dequantization of each tensor by gguf-py (the llama.cpp project's Python
package, which Hugging Face transformers also uses to load GGUF).

Run with a Python that has `gguf` and numpy:  python tests/scripts/make_gguf_fixture.py
Quantized tensors are random blocks (random quant bytes, random finite f16 scales), not model weights.
"""
import importlib.metadata
import json
import pathlib

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "gguf"
ROWS, COLS = 3, 512
# byte offsets of the f16 scale fields inside one block, per type
SCALES = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
          T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def quantized(rng, qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(ROWS, COLS // block, size), dtype=np.uint8)
    for off in SCALES[qtype]:
        scales = (rng.standard_normal((ROWS, COLS // block)) * 0.02).astype(np.float16)
        raw[:, :, off:off + 2] = scales.view(np.uint8).reshape(ROWS, COLS // block, 2)
    return raw.reshape(ROWS, -1)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(OUT / "types.gguf"), arch="avbtest")
    meta = {
        "test.u8": ("uint8", 200), "test.i8": ("int8", -5), "test.u16": ("uint16", 60000), "test.i16": ("int16", -30000),
        "test.u32": ("uint32", 4000000000), "test.i32": ("int32", -2000000000), "test.f32": ("float32", 0.25),
        "test.bool": ("bool", True), "test.string": ("string", "héllo ✓"), "test.u64": ("uint64", 2**60),
        "test.i64": ("int64", -(2**60)), "test.f64": ("float64", 1e-300),
    }
    for key, (kind, value) in meta.items():
        getattr(w, f"add_{kind}")(key, value)
    w.add_array("test.strings", ["a", "bb", "", "ccc"])
    w.add_array("test.ints", [1, -2, 3])
    expected = {}
    for qtype in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]:
        name = f"t.{qtype.name.lower()}"
        if qtype == T.F32:
            data = rng.standard_normal((ROWS, COLS)).astype(np.float32)
            w.add_tensor(name, data)
            ref = data
        elif qtype == T.F16:
            data = rng.standard_normal((ROWS, COLS)).astype(np.float16)
            w.add_tensor(name, data)
            ref = data.astype(np.float32)
        elif qtype == T.BF16:
            bits = (rng.standard_normal((ROWS, COLS)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            raw = bits.view(np.uint8).reshape(ROWS, -1)
            w.add_tensor(name, raw, raw_dtype=qtype)
            ref = gguf.quants.dequantize(raw, qtype)
        else:
            raw = quantized(rng, qtype)
            w.add_tensor(name, raw, raw_dtype=qtype)
            ref = gguf.quants.dequantize(raw, qtype)
        ref = np.asarray(ref, dtype=np.float32).reshape(ROWS, COLS)
        np.save(OUT / f"{qtype.name.lower()}.npy", ref)
        expected[name] = {"type": qtype.name, "shape": [ROWS, COLS]}
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (OUT / "expected.json").write_text(json.dumps({"gguf_py": importlib.metadata.version("gguf"),
                                                   "metadata": {k: v for k, (_, v) in meta.items()} | {"test.strings": ["a", "bb", "", "ccc"], "test.ints": [1, -2, 3]},
                                                   "tensors": expected}, indent=1, ensure_ascii=False) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
