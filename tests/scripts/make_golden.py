#!/usr/bin/env python3
"""Regenerate tests/fixtures/golden/: reference results from numpy, scikit-learn and scipy for the core crate.

Run: python3 tests/scripts/make_golden.py   (needs numpy, scipy, scikit-learn; see tests/scripts/requirements.txt)
Inputs are small seeded matrices shaped like residual-stream activations (a large shared mean, a few outlier
dimensions, a low-rank cross-model relation plus noise). The split and fold assignment re-implement the
SplitMix64/Fisher-Yates rule of docs/formats.md, so this script also pins that rule.
"""
import json
import pathlib

import numpy as np
import scipy
import scipy.stats as st
import sklearn
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "golden"
MASK = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed):
        self.s = seed & MASK

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & MASK
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, m):
        return (self.next() * m) >> 64


def permutation(n, seed):
    rng = SplitMix64(seed)
    p = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.below(i + 1)
        p[i], p[j] = p[j], p[i]
    return p


def split(n, frac, seed):
    p = permutation(n, seed)
    nh = int(round(n * frac))
    return p[nh:], sorted(p[:nh])


def activations(rng, n, d_s, d_t, rank):
    """Paired activation-like matrices: shared latent z, big mean offsets, one outlier dimension each."""
    z = rng.standard_normal((n, rank))
    a = rng.standard_normal((rank, d_s)) * 2.0
    b = rng.standard_normal((rank, d_t)) * 1.5
    x = z @ a + 0.3 * rng.standard_normal((n, d_s)) + rng.standard_normal(d_s) * 4.0
    y = z @ b + 0.5 * rng.standard_normal((n, d_t)) + rng.standard_normal(d_t) * 6.0
    x[:, 0] += 40.0
    y[:, 1] -= 60.0
    return x.astype(np.float32), y.astype(np.float32)


def save(name, arr, dtype=np.float32):
    np.save(OUT / f"{name}.npy", np.ascontiguousarray(arr, dtype=dtype))


def row_cos(p, t):
    return (p * t).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1))


def metrics(pred, truth, train_mean):
    c = row_cos(pred, truth)
    return {
        "n": int(truth.shape[0]),
        "mean_cosine": float(c.mean()),
        "mean_centered_cosine": float(row_cos(pred - train_mean, truth - train_mean).mean()),
        "mean_baseline_cosine": float(row_cos(np.broadcast_to(train_mean, truth.shape), truth).mean()),
        "r2_variance_weighted": float(r2_score(truth, pred, multioutput="variance_weighted")),
        "r2_uniform": float(r2_score(truth, pred, multioutput="uniform_average")),
        "cosine_quantiles": [float(q) for q in np.quantile(c, [0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])],
    }


def ridge_case(name, n, d_s, d_t, lam, seed):
    rng = np.random.default_rng(seed)
    x, y = activations(rng, n, d_s, d_t, rank=6)
    save(f"{name}_x", x)
    save(f"{name}_y", y)
    train_perm, hold = split(n, 0.2, seed=7)
    train = sorted(train_perm)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    model = Ridge(alpha=lam, fit_intercept=True, solver="cholesky").fit(xd[train], yd[train])
    save(f"{name}_weight", model.coef_.T, np.float64)
    save(f"{name}_bias", model.intercept_, np.float64)
    nofit = Ridge(alpha=lam, fit_intercept=False, solver="cholesky").fit(xd[train], yd[train])
    save(f"{name}_weight_nointercept", nofit.coef_.T, np.float64)
    ymean = yd[train].mean(0)
    pred = model.predict(xd[hold])
    k = 5
    fold = {row: i % k for i, row in enumerate(train_perm)}
    grid = [0.01, 1.0, 100.0, 10000.0, 1000000.0]
    cv = []
    for lam_i in grid:
        scores = []
        for f in range(k):
            tr = [r for r in train if fold[r] != f]
            va = [r for r in train if fold[r] == f]
            m = Ridge(alpha=lam_i, solver="cholesky").fit(xd[tr], yd[tr])
            scores.append(r2_score(yd[va], m.predict(xd[va]), multioutput="variance_weighted"))
        cv.append(float(np.mean(scores)))
    # Orthogonal Procrustes with least-squares scale on the training rows.
    xc, yc = xd[train] - xd[train].mean(0), yd[train] - ymean
    u, s, vt = np.linalg.svd(xc.T @ yc, full_matrices=False)
    scale = s.sum() / (xc**2).sum()
    w_p = scale * (u @ vt)
    save(f"{name}_procrustes_weight", w_p, np.float64)
    save(f"{name}_procrustes_bias", ymean - xd[train].mean(0) @ w_p, np.float64)
    return {
        "n": n, "d_src": d_s, "d_tgt": d_t, "lambda": lam, "split_seed": 7, "holdout_fraction": 0.2,
        "train_permutation": train_perm, "holdout": hold,
        "heldout": metrics(pred, yd[hold], ymean),
        "cv_folds": k, "cv_grid": grid, "cv_r2": cv,
    }


def stats_case():
    rng = np.random.default_rng(11)
    n, e = 45, 384
    topic = rng.standard_normal((n, e))
    style = rng.standard_normal(e) * 3.0  # the shared "AV format" component that inflates raw cosines
    native = style + topic + 0.8 * rng.standard_normal((n, e))
    cross = style + 0.5 * topic + 1.0 * rng.standard_normal((n, e))
    control = style + 1.0 * rng.standard_normal((20, e))
    norm = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)
    native, cross, control = norm(native), norm(cross), norm(control)
    save("emb_native", native)
    save("emb_cross", cross)
    save("emb_control", control)
    # Reference lift on the float32 values the Rust side reads.
    nat, cr, ctl = (np.load(OUT / f"emb_{k}.npy").astype(np.float64) for k in ("native", "cross", "control"))
    cos = norm(cr) @ norm(nat).T
    lift = np.array([cos[i, i] - np.delete(cos[i], i).mean() for i in range(n)])
    ctrl_cos = norm(ctl) @ norm(nat).T
    control_lift = np.diag(cos) - ctrl_cos.mean(0)

    samples = {
        "lift": lift,
        "normal60": rng.normal(0.1, 0.5, 60),
        "ties20": np.round(rng.normal(0.3, 1.0, 20), 0),
        "ties10_zero": np.array([1.0, -2.0, 2.0, 3.0, 0.0, 4.0, -1.0, 5.0, 3.0, 2.5]),
        "small12": rng.normal(0.2, 1.0, 12),
    }
    out = {"lift": lift.tolist(), "control_lift": control_lift.tolist(), "samples": {}}
    for name, x in samples.items():
        m, sem = x.mean(), st.sem(x)
        rec = {
            "x": x.tolist(),
            "mean": float(m),
            "t_ci": list(map(float, st.t.interval(0.95, len(x) - 1, loc=m, scale=sem))),
            "ttest_p": float(st.ttest_1samp(x, 0.0).pvalue),
            "ttest_stat": float(st.ttest_1samp(x, 0.0).statistic),
            "ttest_p_greater": float(st.ttest_1samp(x, 0.0, alternative="greater").pvalue),
        }
        for alt in ("two-sided", "greater", "less"):
            w = st.wilcoxon(x, alternative=alt)
            rec[f"wilcoxon_{alt}"] = {"statistic": float(w.statistic), "pvalue": float(w.pvalue)}
        bs = {}
        for method in ("percentile", "BCa"):
            r = st.bootstrap((x,), np.mean, n_resamples=20000, method=method, rng=np.random.default_rng(5))
            bs[method] = [float(r.confidence_interval.low), float(r.confidence_interval.high)]
        rec["bootstrap"] = bs
        out["samples"][name] = rec
    out["t_ppf"] = [[p, df, float(st.t.ppf(p, df))] for p in (0.975, 0.995, 0.5, 0.001) for df in (1, 4, 44, 1000)]
    out["t_sf"] = [[t, df, float(st.t.sf(t, df))] for t in (0.5, 2.0, 8.0, 25.0, -3.0) for df in (3, 44, 200)]
    out["norm_ppf"] = [[p, float(st.norm.ppf(p))] for p in (1e-10, 0.025, 0.3, 0.5, 0.975)]
    out["norm_sf"] = [[z, float(st.norm.sf(z))] for z in (-2.0, 0.0, 1.0, 3.5, 9.0)]
    return out


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    golden = {
        "versions": {"numpy": np.__version__, "scipy": scipy.__version__, "sklearn": sklearn.__version__},
        "ridge_primal": ridge_case("primal", n=300, d_s=40, d_t=24, lam=100.0, seed=1),
        "ridge_dual": ridge_case("dual", n=30, d_s=80, d_t=16, lam=10.0, seed=2),
        "stats": stats_case(),
        "permutation_10_seed42": permutation(10, 42),
    }
    r = SplitMix64(0)
    golden["splitmix64_seed0_first4"] = [str(r.next()) for _ in range(4)]
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
