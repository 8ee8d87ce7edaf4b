//! Ridge, Procrustes, split and held-out metrics against scikit-learn / numpy (tests/scripts/make_golden.py).

mod common;
use avb_core::ridge::{self, Form};
use avb_core::rng;
use common::*;

fn case(
    name: &str,
) -> (
    serde_json::Value,
    avb_core::Matrix,
    avb_core::Matrix,
    Vec<usize>,
    Vec<usize>,
) {
    let g = golden_json()[format!("ridge_{name}")].clone();
    let (x, y) = (load(&format!("{name}_x")), load(&format!("{name}_y")));
    let (train_perm, hold) = rng::split(x.rows, 0.2, 7);
    assert_eq!(
        train_perm,
        usizes(&g["train_permutation"]),
        "split permutation differs from the documented rule"
    );
    assert_eq!(hold, usizes(&g["holdout"]));
    let mut train = train_perm.clone();
    train.sort_unstable();
    (g, x, y, train, hold)
}

fn check_ridge(name: &str) {
    let (g, x, y, train, hold) = case(name);
    let (xt, yt) = (x.select_rows(&train), y.select_rows(&train));
    let lambda = g["lambda"].as_f64().unwrap();
    let (w_ref, b_ref) = (
        load(&format!("{name}_weight")),
        load(&format!("{name}_bias")),
    );
    for form in [Form::Auto, Form::Primal, Form::Dual] {
        let fit = ridge::fit_ridge(&xt, &yt, lambda, form, true).unwrap();
        let (map, used) = (fit.map, fit.form);
        let (ew, eb) = (
            rel_err(&map.weight.data, &w_ref.data),
            rel_err(&map.bias, &b_ref.data),
        );
        assert!(
            ew < 1e-4 && eb < 1e-4,
            "{name} {form:?} (used {used:?}): weight rel err {ew:e}, bias rel err {eb:e}"
        );
    }
    let auto = ridge::fit_ridge(&xt, &yt, lambda, Form::Auto, true).unwrap();
    assert_eq!(
        auto.form,
        if xt.rows >= xt.cols {
            Form::Primal
        } else {
            Form::Dual
        }
    );
    let map = ridge::fit_ridge(&xt, &yt, lambda, Form::Auto, false)
        .unwrap()
        .map;
    let e = rel_err(
        &map.weight.data,
        &load(&format!("{name}_weight_nointercept")).data,
    );
    assert!(e < 1e-4, "{name} without intercept: rel err {e:e}");
    assert!(map.bias.iter().all(|b| *b == 0.0));

    // Held-out metrics equal numpy/sklearn's on the same split.
    let map = ridge::fit_ridge(&xt, &yt, lambda, Form::Auto, true)
        .unwrap()
        .map;
    let (xh, yh) = (x.select_rows(&hold), y.select_rows(&hold));
    let m = ridge::fit_metrics(
        &map.apply(&xh, true).unwrap(),
        &yh,
        &ridge::target_mean(&yt),
    );
    let r = &g["heldout"];
    assert_eq!(m.n, hold.len());
    for (key, got) in [
        ("mean_cosine", m.mean_cosine),
        ("mean_centered_cosine", m.mean_centered_cosine),
        ("mean_baseline_cosine", m.mean_baseline_cosine),
        ("r2_variance_weighted", m.r2_variance_weighted),
        ("r2_uniform", m.r2_uniform),
    ] {
        assert_close(
            got,
            r[key].as_f64().unwrap(),
            1e-5,
            &format!("{name} held-out {key}"),
        );
    }
    for (got, want) in m.cosine_quantiles.iter().zip(f64s(&r["cosine_quantiles"])) {
        assert_close(*got, want, 1e-5, &format!("{name} cosine quantile"));
    }

    // k-fold CV scores over the grid equal sklearn's Ridge + r2_score on the same folds.
    let k = g["cv_folds"].as_u64().unwrap() as usize;
    let train_perm = usizes(&g["train_permutation"]);
    let mut fold_of = vec![0; x.rows];
    for (i, row) in train_perm.iter().enumerate() {
        fold_of[*row] = i % k;
    }
    let folds: Vec<usize> = train.iter().map(|r| fold_of[*r]).collect();
    let grid = f64s(&g["cv_grid"]);
    let cv =
        ridge::cross_validate(&xt, &yt, &folds, k, &grid, Form::Auto, true, &mut |_| {}).unwrap();
    for ((got, want), l) in cv.iter().zip(f64s(&g["cv_r2"])).zip(&grid) {
        assert_close(*got, want, 1e-5, &format!("{name} CV R^2 at lambda {l}"));
    }
}

#[test]
fn ridge_primal_regime_matches_sklearn() {
    check_ridge("primal");
}

#[test]
fn ridge_dual_regime_matches_sklearn() {
    check_ridge("dual");
}

#[test]
fn uncentred_fit_solves_in_f64() {
    // Without an intercept the Gram carries the large shared offset (ill-conditioned by construction): f64 solve.
    // (~1e-4 here) fails the a-posteriori check, and the f64 solve gives sklearn's answer.
    let (g, x, y, train, _) = case("primal");
    let fit = ridge::fit_ridge(
        &x.select_rows(&train),
        &y.select_rows(&train),
        g["lambda"].as_f64().unwrap(),
        Form::Primal,
        false,
    )
    .unwrap();
    assert!(fit.f32_solve.is_none());
    let e = rel_err(
        &fit.map.weight.data,
        &load("primal_weight_nointercept").data,
    );
    assert!(e < 1e-4, "f64 fallback rel err {e:e}");
}

fn normal_rows(n: usize, d: usize, seed: u64) -> avb_core::Matrix {
    let mut r = rng::SplitMix64::new(seed);
    avb_core::Matrix::new(n, d, (0..n * d).map(|_| r.normal() as f32).collect())
}

/// Largest relative residual of (Xc^T Xc + lambda I) W = Xc^T Yc with centred data, in f64: the equations both
/// forms solve.
fn normal_equation_residual(
    x: &avb_core::Matrix,
    y: &avb_core::Matrix,
    w: &avb_core::Matrix,
    lambda: f64,
) -> f64 {
    let (n, d, t) = (x.rows, x.cols, y.cols);
    let mean =
        |m: &avb_core::Matrix, j: usize| (0..n).map(|i| m.row(i)[j] as f64).sum::<f64>() / n as f64;
    let (mx, my): (Vec<f64>, Vec<f64>) = (
        (0..d).map(|j| mean(x, j)).collect(),
        (0..t).map(|j| mean(y, j)).collect(),
    );
    let xc = |i: usize, j: usize| x.row(i)[j] as f64 - mx[j];
    let yc = |i: usize, j: usize| y.row(i)[j] as f64 - my[j];
    let gram: Vec<f64> = (0..d * d)
        .map(|ak| (0..n).map(|i| xc(i, ak / d) * xc(i, ak % d)).sum())
        .collect();
    let mut worst = 0f64;
    for a in 0..d {
        for b in 0..t {
            let lhs: f64 = (0..d)
                .map(|k| (gram[a * d + k] + if k == a { lambda } else { 0.0 }) * w.row(k)[b] as f64)
                .sum();
            let rhs: f64 = (0..n).map(|i| xc(i, a) * yc(i, b)).sum();
            worst = worst.max((lhs - rhs).abs() / rhs.abs().max(1.0));
        }
    }
    worst
}

#[test]
fn well_conditioned_solve_stays_in_f32_and_solves_the_normal_equations() {
    for (form, n, d) in [(Form::Primal, 400, 16), (Form::Dual, 24, 64)] {
        let (x, y) = (normal_rows(n, d, 3), normal_rows(n, 8, 4));
        let fit = ridge::fit_ridge(&x, &y, 1.0, form, true).unwrap();
        assert!(
            fit.f32_solve.is_some_and(|e| e <= 1e-5),
            "{form:?}: {:?}",
            fit.f32_solve
        );
        let worst = normal_equation_residual(&x, &y, &fit.map.weight, 1.0);
        assert!(worst < 1e-4, "{form:?}: normal-equation residual {worst:e}");
    }
}

/// x - its column means.
fn centred(m: &avb_core::Matrix) -> avb_core::Matrix {
    let mean = ridge::target_mean(m);
    let mut c = m.clone();
    for i in 0..c.rows {
        for (v, mu) in c.row_mut(i).iter_mut().zip(&mean) {
            *v = (*v as f64 - mu) as f32;
        }
    }
    c
}

#[test]
fn gemm_kernel_paths_equal_the_f64_solve() {
    // Shapes large enough for the GEMM kernel: three row blocks in the blocked triangular solves and Gram
    // column blocks of unequal width (primal), Z = K^-1 Xc by the same solves (dual). The reference is the f64
    // solve of the same system (the fit without an intercept, always f64, on data centred beforehand).
    for (form, n, d) in [(Form::Primal, 1200, 600), (Form::Dual, 300, 600)] {
        let (x, y) = (normal_rows(n, d, 8), normal_rows(n, 40, 9));
        let fit = ridge::fit_ridge(&x, &y, 1.0, form, true).unwrap();
        assert!(fit.f32_solve.is_some(), "{form:?} stays in f32");
        let f64_fit = ridge::fit_ridge(&centred(&x), &centred(&y), 1.0, form, false).unwrap();
        let e = rel_err(&fit.map.weight.data, &f64_fit.map.weight.data);
        assert!(e < 1e-4, "{form:?}: differs from the f64 solve by {e:e}");
    }
}

#[test]
fn ill_conditioned_dual_solve_falls_back_to_f64() {
    // Pairs of nearly equal rows make X X^T + lambda I nearly singular at a small lambda: the f32 path fails its
    // end-to-end check and W is solved again in f64. That must equal the f64 solve of the same system: the fit
    // without an intercept (always f64) on data centred beforehand.
    let (mut x, y) = (normal_rows(40, 64, 5), normal_rows(40, 8, 6));
    for i in (0..40).step_by(2) {
        let twin: Vec<f32> = x.row(i).iter().map(|v| v * 1.0001).collect();
        x.row_mut(i + 1).copy_from_slice(&twin);
    }
    let lambda = 1e-2;
    let fit = ridge::fit_ridge(&x, &y, lambda, Form::Dual, true).unwrap();
    assert!(fit.f32_solve.is_none(), "{:?}", fit.f32_solve);
    let f64_fit = ridge::fit_ridge(&centred(&x), &centred(&y), lambda, Form::Dual, false).unwrap();
    let e = rel_err(&fit.map.weight.data, &f64_fit.map.weight.data);
    assert!(e < 1e-3, "fallback differs from the f64 solve by {e:e}");
}

#[test]
fn ill_conditioned_primal_solve_refills_and_solves_in_f64() {
    // Twin columns x_2k+1 = x_2k + 0.005 z_k leave X^T X one small eigenvalue per pair, and targets y_k = z_k live
    // in those directions alone, at lambda of the same size: the f32 solve's error there is large next to the
    // predictions and fails the check. The solve's storage, which by then holds the f32 solution, is refilled
    // with B and solved in f64, equal to the f64 solve of the same system.
    let (n, d, t) = (200, 40, 8);
    let (mut x, y) = (normal_rows(n, d, 5), normal_rows(n, t, 6));
    for i in 0..n {
        let z = y.row(i).to_vec();
        let row = x.row_mut(i);
        for j in (0..d).step_by(2) {
            row[j + 1] = row[j] + 0.005 * z[(j / 2) % t];
        }
    }
    let lambda = 0.005;
    let fit = ridge::fit_ridge(&x, &y, lambda, Form::Primal, true).unwrap();
    assert!(fit.f32_solve.is_none(), "{:?}", fit.f32_solve);
    let f64_fit =
        ridge::fit_ridge(&centred(&x), &centred(&y), lambda, Form::Primal, false).unwrap();
    let e = rel_err(&fit.map.weight.data, &f64_fit.map.weight.data);
    assert!(e < 1e-3, "fallback differs from the f64 solve by {e:e}");
}

#[test]
fn procrustes_matches_numpy_svd() {
    for name in ["primal", "dual"] {
        let (_, x, y, train, _) = case(name);
        let map =
            ridge::fit_procrustes(&x.select_rows(&train), &y.select_rows(&train), true).unwrap();
        let ew = rel_err(
            &map.weight.data,
            &load(&format!("{name}_procrustes_weight")).data,
        );
        let eb = rel_err(&map.bias, &load(&format!("{name}_procrustes_bias")).data);
        assert!(
            ew < 1e-4 && eb < 1e-4,
            "{name}: procrustes weight rel err {ew:e}, bias {eb:e}"
        );
    }
}

#[test]
fn splitmix64_matches_the_documented_sequence() {
    let g = golden_json();
    let mut r = rng::SplitMix64::new(0);
    let got: Vec<String> = (0..4).map(|_| r.next_u64().to_string()).collect();
    let want: Vec<String> = g["splitmix64_seed0_first4"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        rng::permutation(10, 42),
        usizes(&g["permutation_10_seed42"])
    );
}
