#!/usr/bin/env python3
"""Reference side of `avb bench ridge`: time scikit-learn Ridge on the same float32 matrices.

Usage: bench_ridge_reference.py X.npy Y.npy W_OUT.npy --lambda 100 --reps 3
Prints JSON: median fit seconds, all times, numpy's sgemm rate (GFLOP/s) and library versions; saves W (d_src x d_tgt).
"""
import argparse
import json
import time

import numpy as np
import sklearn
from sklearn.linear_model import Ridge


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("x")
    ap.add_argument("y")
    ap.add_argument("w_out")
    ap.add_argument("--lambda", dest="lam", type=float, default=100.0)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    x, y = np.load(a.x), np.load(a.y)
    times = []
    for _ in range(a.reps + 1):  # first run is a warm-up
        t = time.perf_counter()
        model = Ridge(alpha=a.lam).fit(x, y)
        times.append(time.perf_counter() - t)
    np.save(a.w_out, np.ascontiguousarray(model.coef_.T, dtype=np.float32))
    m = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    m @ m
    t = time.perf_counter()
    m @ m
    gemm = 2 * 4096**3 / (time.perf_counter() - t) / 1e9
    timed = times[1:]
    print(json.dumps({"median_s": float(np.median(timed)), "times_s": timed, "numpy_sgemm_gflops": gemm,
                      "versions": {"sklearn": sklearn.__version__, "numpy": np.__version__}}))


if __name__ == "__main__":
    main()
