//! Lift, confidence intervals and p-values against numpy / scipy (tests/scripts/make_golden.py).

mod common;
use avb_core::stats::{self, Alternative};
use common::*;

#[test]
fn lift_and_control_lift_match_numpy() {
    let g = golden_json();
    let (native, cross, control) = (load("emb_native"), load("emb_cross"), load("emb_control"));
    let lift = stats::lift(&cross, &native).unwrap();
    for (i, (a, b)) in lift.iter().zip(f64s(&g["stats"]["lift"])).enumerate() {
        assert_close(*a, b, 1e-9, &format!("lift[{i}]"));
    }
    let cl = stats::control_lift(&cross, &native, &control).unwrap();
    for (i, (a, b)) in cl.iter().zip(f64s(&g["stats"]["control_lift"])).enumerate() {
        assert_close(*a, b, 1e-9, &format!("control lift[{i}]"));
    }
}

#[test]
fn distributions_match_scipy() {
    let g = golden_json();
    for row in g["stats"]["t_ppf"].as_array().unwrap() {
        let r = f64s(row);
        assert_rel(
            stats::t_ppf(r[0], r[1]),
            r[2],
            1e-9,
            &format!("t.ppf({}, {})", r[0], r[1]),
        );
    }
    for row in g["stats"]["t_sf"].as_array().unwrap() {
        let r = f64s(row);
        assert_rel(
            stats::t_sf(r[0], r[1]),
            r[2],
            1e-9,
            &format!("t.sf({}, {})", r[0], r[1]),
        );
    }
    for row in g["stats"]["norm_ppf"].as_array().unwrap() {
        let r = f64s(row);
        if r[1] == 0.0 {
            assert_close(stats::norm_ppf(r[0]), 0.0, 1e-12, "norm.ppf(0.5)");
        } else {
            assert_rel(
                stats::norm_ppf(r[0]),
                r[1],
                1e-9,
                &format!("norm.ppf({})", r[0]),
            );
        }
    }
    for row in g["stats"]["norm_sf"].as_array().unwrap() {
        let r = f64s(row);
        assert_rel(
            stats::norm_sf(r[0]),
            r[1],
            1e-9,
            &format!("norm.sf({})", r[0]),
        );
    }
}

#[test]
fn tests_and_intervals_match_scipy() {
    let g = golden_json();
    for (name, rec) in g["stats"]["samples"].as_object().unwrap() {
        let x = f64s(&rec["x"]);
        assert_close(
            stats::mean(&x),
            rec["mean"].as_f64().unwrap(),
            1e-12,
            &format!("{name} mean"),
        );
        let (lo, hi) = stats::t_interval(&x, 0.95);
        let ci = f64s(&rec["t_ci"]);
        assert_close(lo, ci[0], 1e-9, &format!("{name} t CI low"));
        assert_close(hi, ci[1], 1e-9, &format!("{name} t CI high"));
        let t = stats::ttest_1samp(&x, 0.0, Alternative::TwoSided);
        assert_rel(
            t.statistic,
            rec["ttest_stat"].as_f64().unwrap(),
            1e-9,
            &format!("{name} t statistic"),
        );
        assert_rel(
            t.pvalue,
            rec["ttest_p"].as_f64().unwrap(),
            1e-9,
            &format!("{name} t-test p"),
        );
        let tg = stats::ttest_1samp(&x, 0.0, Alternative::Greater);
        assert_rel(
            tg.pvalue,
            rec["ttest_p_greater"].as_f64().unwrap(),
            1e-9,
            &format!("{name} t-test p (greater)"),
        );
        for (alt, key) in [
            (Alternative::TwoSided, "wilcoxon_two-sided"),
            (Alternative::Greater, "wilcoxon_greater"),
            (Alternative::Less, "wilcoxon_less"),
        ] {
            let w = stats::wilcoxon(&x, alt).unwrap();
            assert_close(
                w.statistic,
                rec[key]["statistic"].as_f64().unwrap(),
                1e-9,
                &format!("{name} {key} statistic"),
            );
            assert_rel(
                w.pvalue,
                rec[key]["pvalue"].as_f64().unwrap(),
                1e-9,
                &format!("{name} {key} p ({})", w.method),
            );
        }
        // Bootstrap: both sides resample 20,000 times with their own generators, so endpoints agree up to Monte
        // Carlo error (~0.5% of the CI width per endpoint); the stated tolerance is 3% of the width, plus one
        // lattice step of the resampled mean for samples with repeated values (their bootstrap means are discrete).
        let b = stats::bootstrap_mean(&x, 0.95, 20_000, 5);
        let mut sorted = x.clone();
        sorted.sort_by(f64::total_cmp);
        let min_gap = sorted
            .windows(2)
            .map(|w| w[1] - w[0])
            .filter(|g| *g > 0.0)
            .fold(f64::INFINITY, f64::min);
        let has_repeats = sorted.windows(2).any(|w| w[0] == w[1]);
        let lattice = if has_repeats {
            min_gap / x.len() as f64
        } else {
            0.0
        };
        for (method, got) in [("percentile", b.percentile), ("BCa", b.bca)] {
            let want = f64s(&rec["bootstrap"][method]);
            let tol = 0.03 * (want[1] - want[0]) + lattice;
            assert_close(
                got.0,
                want[0],
                tol,
                &format!("{name} bootstrap {method} low"),
            );
            assert_close(
                got.1,
                want[1],
                tol,
                &format!("{name} bootstrap {method} high"),
            );
        }
    }
}

#[test]
fn bootstrap_is_reproducible_from_its_seed() {
    let x: Vec<f64> = (0..30)
        .map(|i| ((i * 37) % 11) as f64 / 10.0 - 0.3)
        .collect();
    assert_eq!(
        stats::bootstrap_mean(&x, 0.95, 2000, 9),
        stats::bootstrap_mean(&x, 0.95, 2000, 9)
    );
    assert_ne!(
        stats::bootstrap_mean(&x, 0.95, 2000, 9).bca,
        stats::bootstrap_mean(&x, 0.95, 2000, 10).bca
    );
}
