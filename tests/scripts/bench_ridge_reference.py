#!/usr/bin/env python3
"""Reference side of `avb bench ridge`: time scikit-learn Ridge on the same float32 matrices, on request.

Usage: bench_ridge_reference.py X.npy Y.npy W_OUT.npy --lambda 100
Loads the matrices once, then reads commands on stdin, one per line, and answers each with one JSON line:
  fit     -> {"s": seconds of one Ridge(alpha=lambda).fit}
  finish  -> saves W (d_src x d_tgt) to W_OUT.npy and answers {"numpy_sgemm_gflops": ..., "versions": {...}}
The caller times its own fits between ours, so that both sides see the same state of the machine.
"""
import argparse
import json
import sys
import time

import numpy as np
import sklearn
from sklearn.linear_model import Ridge


def answer(obj):
    print(json.dumps(obj), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("x")
    ap.add_argument("y")
    ap.add_argument("w_out")
    ap.add_argument("--lambda", dest="lam", type=float, default=100.0)
    a = ap.parse_args()
    x, y = np.load(a.x), np.load(a.y)
    model = None
    answer({"ready": True})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "fit":
            t = time.perf_counter()
            model = Ridge(alpha=a.lam).fit(x, y)
            answer({"s": time.perf_counter() - t})
        elif cmd == "finish":
            if model is None:
                sys.exit("finish before any fit")
            np.save(a.w_out, np.ascontiguousarray(model.coef_.T, dtype=np.float32))
            m = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
            m @ m
            t = time.perf_counter()
            m @ m
            gemm = 2 * 4096**3 / (time.perf_counter() - t) / 1e9
            answer({"numpy_sgemm_gflops": gemm,
                    "versions": {"sklearn": sklearn.__version__, "numpy": np.__version__}})
            return
        else:
            sys.exit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
