//! Linear maps between residual streams: ridge regression (primal or dual form, lambda given or chosen by
//! k-fold CV with one eigendecomposition per fold serving the whole grid), orthogonal Procrustes as a baseline,
//! and the held-out fit metrics stored with every map.
//!
//! Precision: the big products (Gram matrices, X^T Y, predictions) run in f32 on centred data (crate::gemm);
//! the Cholesky solves run in f32 with an a-posteriori check in f64, falling back to f64 factorisations. This matches
//! scikit-learn's float64 `Ridge` to ~1e-6 relative on activation-like data while costing what a float32 solve
//! costs.

use crate::artifact::FitMetrics;
use crate::error::{AvbError, Result};
use crate::gemm::{self, Shift, Shifted};
use crate::matrix::{cosine, Matrix};
use faer::linalg::solvers::{Llt, Solve};
use faer::{Mat, MatMut, MatRef, Side};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// Primal when n >= d_src, dual otherwise.
    Auto,
    /// W = (X^T X + lambda I)^-1 X^T Y: a d_src x d_src system.
    Primal,
    /// W = X^T (X X^T + lambda I)^-1 Y: an n x n system.
    Dual,
}

impl Form {
    fn resolve(self, n: usize, d: usize) -> Form {
        match self {
            Form::Auto if n >= d => Form::Primal,
            Form::Auto => Form::Dual,
            f => f,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Form::Auto => "auto",
            Form::Primal => "primal",
            Form::Dual => "dual",
        }
    }
}

/// y = x W + b, with W [d_src, d_tgt].
#[derive(Clone, Debug)]
pub struct AffineMap {
    pub weight: Matrix,
    pub bias: Vec<f32>,
}

impl AffineMap {
    pub fn d_src(&self) -> usize {
        self.weight.rows
    }
    pub fn d_tgt(&self) -> usize {
        self.weight.cols
    }

    /// x W + b for every row of x (b omitted when `affine` is false: the linear part maps directions).
    pub fn apply(&self, x: &Matrix, affine: bool) -> Result<Matrix> {
        if x.cols != self.d_src() {
            return Err(AvbError::dimension(
                "applying a map",
                format!("inputs have d = {} but the map expects d_src = {}", x.cols, self.d_src()),
                "use a map fitted FROM the space these vectors live in (check the source model and layer)",
            ));
        }
        // (x W)^T = W^T x^T, column-major, is x W's row-major storage.
        let mut m = Matrix::new(x.rows, self.d_tgt(), vec![0f32; x.rows * self.d_tgt()]);
        gemm::product_into(
            MatMut::from_column_major_slice_mut(&mut m.data, self.d_tgt(), x.rows),
            row_major(&self.weight).transpose(),
            row_major(x).transpose(),
        );
        if affine {
            for i in 0..m.rows {
                for (v, b) in m.row_mut(i).iter_mut().zip(&self.bias) {
                    *v += *b;
                }
            }
        }
        Ok(m)
    }
}

fn to_f32_vec(v: &[f64]) -> Vec<f32> {
    v.iter().map(|a| *a as f32).collect()
}

fn row_major(m: &Matrix) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(&m.data, m.rows, m.cols)
}

fn to_f64(m: MatRef<'_, f32>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64)
}

fn to_f32(m: MatRef<'_, f64>) -> Mat<f32> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32)
}

/// Column means in f64 (zeros when not fitting an intercept).
fn column_means(m: &Matrix, fit_intercept: bool) -> Vec<f64> {
    let mut mean = vec![0f64; m.cols];
    if !fit_intercept || m.rows == 0 {
        return mean;
    }
    // Fixed blocks of rows summed on all cores, then added in block order: the same sums whatever the threads.
    const BLOCK_ROWS: usize = 1024;
    let block_sums = |rows: &[f32]| {
        let mut sums = vec![0f64; m.cols];
        for row in rows.chunks_exact(m.cols) {
            for (a, v) in sums.iter_mut().zip(row) {
                *a += *v as f64;
            }
        }
        sums
    };
    #[cfg(feature = "parallel")]
    let blocks: Vec<Vec<f64>> = {
        use rayon::prelude::*;
        m.data
            .par_chunks(BLOCK_ROWS * m.cols)
            .map(block_sums)
            .collect()
    };
    #[cfg(not(feature = "parallel"))]
    let blocks: Vec<Vec<f64>> = m.data.chunks(BLOCK_ROWS * m.cols).map(block_sums).collect();
    for sums in &blocks {
        mean.iter_mut().zip(sums).for_each(|(a, s)| *a += s);
    }
    mean.iter_mut().for_each(|a| *a /= m.rows as f64);
    mean
}

/// Run `f(block_index, block)` over consecutive `block_len` chunks of `out`, on all cores when built with the
/// `parallel` feature.
fn for_blocks(out: &mut [f32], block_len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    #[cfg(feature = "parallel")]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(block_len)
            .enumerate()
            .for_each(|(k, b)| f(k, b));
    }
    #[cfg(not(feature = "parallel"))]
    out.chunks_mut(block_len)
        .enumerate()
        .for_each(|(k, b)| f(k, b));
}

const TILE: usize = 64;

/// An owned column-major f32 buffer viewed as a faer matrix.
struct ColMajor {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl ColMajor {
    fn as_ref(&self) -> MatRef<'_, f32> {
        MatRef::from_column_major_slice(&self.data, self.rows, self.cols)
    }
}

/// (m - mean) transposed: a column-major [cols, rows] buffer, which is the row-major input's own order.
fn centered_t(m: &Matrix, mean: &[f64]) -> ColMajor {
    let c = m.cols;
    let mean32: Vec<f32> = mean.iter().map(|v| *v as f32).collect();
    let mut out = vec![0f32; m.data.len()];
    for_blocks(&mut out, 256 * c.max(1), |k, block| {
        let src = &m.data[k * 256 * c..k * 256 * c + block.len()];
        for (o, (v, j)) in block.iter_mut().zip(src.iter().zip((0..c).cycle())) {
            *o = v - mean32[j];
        }
    });
    ColMajor {
        data: out,
        rows: c,
        cols: m.rows,
    }
}

/// A column-major faer matrix as a row-major Matrix, transposed in tiles.
fn to_row_major(m: MatRef<'_, f32>) -> Matrix {
    let (r, c) = (m.nrows(), m.ncols());
    let mut out = vec![0f32; r * c];
    for_blocks(&mut out, TILE * c.max(1), |k, block| {
        let i0 = k * TILE;
        let rows = block.len() / c.max(1);
        for j0 in (0..c).step_by(TILE) {
            for j in j0..(j0 + TILE).min(c) {
                let col = m.col(j);
                for di in 0..rows {
                    block[di * c + j] = col[i0 + di];
                }
            }
        }
    });
    Matrix::new(r, c, out)
}

/// Both sides non-empty, on the same rows and finite; returns their column means. The finiteness check rides on
/// the sums (a NaN or Inf makes its column's sum non-finite), so only a failing input is searched again for the
/// cell to name.
fn check_pair(x: &Matrix, y: &Matrix) -> Result<(Vec<f64>, Vec<f64>)> {
    x.check_nonempty("source activations")?;
    y.check_nonempty("target activations")?;
    if x.rows != y.rows {
        return Err(AvbError::dimension(
            "fitting a map",
            format!("source has {} rows but target has {}", x.rows, y.rows),
            "capture both models on the same corpus rows (same row ids, same order)",
        ));
    }
    let checked_means = |m: &Matrix, what: &str| -> Result<Vec<f64>> {
        let mean = column_means(m, true);
        if mean.iter().any(|v| !v.is_finite()) {
            m.check_finite(what)?;
        }
        Ok(mean)
    };
    Ok((
        checked_means(x, "source activations")?,
        checked_means(y, "target activations")?,
    ))
}

fn check_lambda(lambda: f64) -> Result<()> {
    if !(lambda.is_finite() && lambda >= 0.0) {
        return Err(AvbError::Invalid(format!(
            "lambda must be a finite number >= 0, got {lambda}"
        )));
    }
    Ok(())
}

fn singular(form: Form, lambda: f64) -> AvbError {
    AvbError::Singular {
        what: format!("ridge {} solve", form.name()),
        detail: format!("the regularised Gram matrix is not positive definite at lambda = {lambda}"),
        fix: "use a larger --lambda (lambda = 0 needs full-rank, well-conditioned inputs), or remove duplicate/constant rows".into(),
    }
}

fn intercept(x_mean: &[f64], y_mean: &[f64], w: &Matrix) -> Vec<f32> {
    let mut b = y_mean.to_vec();
    for (k, xm) in x_mean.iter().enumerate() {
        if *xm != 0.0 {
            for (bj, wv) in b.iter_mut().zip(w.row(k)) {
                *bj -= xm * *wv as f64;
            }
        }
    }
    b.iter().map(|v| *v as f32).collect()
}

/// Ridge regression, equal to scikit-learn's `Ridge(alpha=lambda, fit_intercept=...)`.
pub fn fit_ridge(
    x: &Matrix,
    y: &Matrix,
    lambda: f64,
    form: Form,
    fit_intercept: bool,
) -> Result<RidgeFit> {
    // Always centre before the f32 products: activations carry a large shared offset that f32 sums would
    // lose. Without an intercept the rank-one terms are added back in f64.
    let (xm, ym) = check_pair(x, y)?;
    check_lambda(lambda)?;
    let form = form.resolve(x.rows, x.cols);
    // Xc = X - 1 xm^T, its transpose and Yc as shifted views of the row-major inputs: the products centre
    // while they pack their operands, so the inputs are never copied.
    let (xm32, ym32) = (to_f32_vec(&xm), to_f32_vec(&ym));
    let xc = Shifted::minus_row(row_major(x), &xm32);
    let (xct, yc) = (xc.transpose(), Shifted::minus_row(row_major(y), &ym32));
    let n = x.rows as f64;
    let (weight, f32_solve): (Matrix, Option<f64>) = match form {
        Form::Primal | Form::Auto => {
            let mut g = gemm::lower_product(xct, xc);
            if fit_intercept {
                add_ridge(&mut g, lambda);
                let mut w = Mat::<f32>::zeros(x.cols, y.cols);
                let f32_solve =
                    solve_spd(g, lambda, w.as_mut(), &|b| gemm::product_into(b, xct, yc))
                        .ok_or_else(|| singular(form, lambda))?;
                (to_row_major(w.as_ref()), f32_solve)
            } else {
                // Without an intercept the Gram carries n xm xm^T and is ill-conditioned by construction: f64.
                let b = gemm::product(xct, yc);
                let (mut g, mut b) = (to_f64(g.as_ref()), to_f64(b.as_ref()));
                add_outer(&mut g, n, &xm, &xm);
                add_outer(&mut b, n, &xm, &ym);
                for k in 0..g.nrows() {
                    g[(k, k)] += lambda;
                }
                let w = solve_spd_f64(&g, &b).ok_or_else(|| singular(form, lambda))?;
                (to_row_major(w.as_ref()), None)
            }
        }
        Form::Dual => {
            let mut k = gemm::lower_product(xc, xct);
            if fit_intercept {
                add_ridge(&mut k, lambda);
                dual_weight(&k, xc, yc, lambda).ok_or_else(|| singular(form, lambda))?
            } else {
                // X X^T = Xc Xc^T + v 1^T + 1 v^T + |xm|^2 1 1^T with v = Xc xm; the targets are uncentred.
                let mut k = to_f64(k.as_ref());
                for i in 0..k.nrows() {
                    k[(i, i)] += lambda;
                }
                let v: Vec<f64> = mat_vec(xc, &xm);
                let mm: f64 = xm.iter().map(|a| a * a).sum();
                let mut rhs = to_f64(yc.to_mat().as_ref());
                for i in 0..x.rows {
                    for j in 0..=i {
                        k[(i, j)] += v[i] + v[j] + mm;
                    }
                    for (t, m) in ym.iter().enumerate() {
                        rhs[(i, t)] += m;
                    }
                }
                let a = solve_spd_f64(&k, &rhs).ok_or_else(|| singular(form, lambda))?;
                // X^T A = Xc^T A + xm (1^T A)
                let mut w = gemm::product(xct, a.as_ref());
                for t in 0..a.ncols() {
                    let col_sum: f64 = (0..a.nrows()).map(|i| a[(i, t)] as f64).sum();
                    for (j, m) in xm.iter().enumerate() {
                        w[(j, t)] += (m * col_sum) as f32;
                    }
                }
                (to_row_major(w.as_ref()), None)
            }
        }
    };
    check_solution(&weight, form, lambda)?;
    let bias = if fit_intercept {
        intercept(&xm, &ym, &weight)
    } else {
        vec![0.0; y.cols]
    };
    Ok(RidgeFit {
        map: AffineMap { weight, bias },
        form,
        f32_solve,
    })
}

/// A fitted ridge map and how it was solved.
#[derive(Clone, Debug)]
pub struct RidgeFit {
    pub map: AffineMap,
    pub form: Form,
    /// Some(estimated relative prediction error) when the triangular solves ran in f32 and passed the
    /// a-posteriori check; None when they ran in f64.
    pub f32_solve: Option<f64>,
}

/// Largest prediction-space error (estimated on random probes) accepted from the f32 triangular solves: far
/// below any map's own held-out error (R^2 of 0.6-0.9 leaves 10-40% of the variance unexplained).
const F32_SOLVE_TOL: f64 = 1e-4;

/// Solve G W = B for symmetric positive definite G (only its lower triangle is read) in f64.
fn solve_spd_f64(g: &Mat<f64>, b: &Mat<f64>) -> Option<Mat<f32>> {
    Some(to_f32(g.llt(Side::Lower).ok()?.solve(b).as_ref()))
}

/// Solve G W = B for symmetric positive definite G (only its lower triangle is read) in place: `fill_b` writes B
/// into `w` (any layout), which then becomes W. First entirely in f32 (Cholesky and the two triangular solves,
/// 2 r^2 c flops, the costly part), then checked a posteriori: for random probe vectors s, e = G^-1 (B s - G W s)
/// with the residual in f64 estimates the error of W s, and the check compares the map's outputs on the training
/// rows, ||Xc e|| against ||Xc W s||, rather than W along directions the data never visits. Those norms come from
/// G = Xc^T Xc + lambda I itself: ||Xc v||^2 = v^T (G - lambda I) v. Above F32_SOLVE_TOL B is written again and
/// everything is redone in f64. Returns None when G is not positive definite, else, when the f32 path was kept,
/// its estimated error.
fn solve_spd(
    g: Mat<f32>,
    lambda: f64,
    mut w: MatMut<'_, f32>,
    fill_b: &dyn Fn(MatMut<'_, f32>),
) -> Option<Option<f64>> {
    let solve_f64 = |g: &Mat<f32>, mut w: MatMut<'_, f32>| {
        fill_b(w.as_mut());
        let sol = solve_spd_f64(&to_f64(g.as_ref()), &to_f64(w.as_ref()))?;
        w.copy_from(sol);
        Some(None)
    };
    let Ok(llt32) = g.llt(Side::Lower) else {
        return solve_f64(&g, w);
    };
    fill_b(w.as_mut());
    let probes = random_probes(w.ncols());
    // B s before B is overwritten by W.
    let bs = times_f64(w.as_ref().into(), probes.as_ref());
    cholesky_solve_in_place(llt32.L(), w.as_mut());
    let ws = times_f64(w.as_ref().into(), probes.as_ref());
    let res = bs - sym_lower_times(g.as_ref(), ws.as_ref());
    let err = to_f64(llt32.solve(to_f32(res.as_ref())).as_ref());
    let output_norms = |v: &Mat<f64>| -> Vec<f64> {
        let gv = sym_lower_times(g.as_ref(), v.as_ref());
        (0..v.ncols())
            .map(|k| {
                let q: f64 = (0..v.nrows())
                    .map(|i| v[(i, k)] * (gv[(i, k)] - lambda * v[(i, k)]))
                    .sum();
                q.max(0.0).sqrt()
            })
            .collect()
    };
    let worst = worst_ratio(&output_norms(&err), &output_norms(&ws));
    if worst.is_finite() && worst <= F32_SOLVE_TOL {
        Some(Some(worst))
    } else {
        solve_f64(&g, w)
    }
}

/// Solve L L^T W = B in place for lower-triangular L: forward then backward substitution by blocks of rows,
/// each block solved against its diagonal block and then subtracted from the remaining rows by the GEMM kernel,
/// which so does all but a block's width over the dimension of the flops (faer's triangular solves with thousands
/// of right-hand sides ran at about 80% of its rate).
fn cholesky_solve_in_place(l: MatRef<'_, f32>, mut w: MatMut<'_, f32>) {
    const BLOCK: usize = 256;
    let d = l.nrows();
    let blocks: Vec<(usize, usize)> = (0..d)
        .step_by(BLOCK)
        .map(|k0| (k0, BLOCK.min(d - k0)))
        .collect();
    for &(k0, nb) in &blocks {
        let diag = l.submatrix(k0, k0, nb, nb);
        diag.solve_lower_triangular_in_place(w.as_mut().subrows_mut(k0, nb));
        let (solved, rest) = w.as_mut().split_at_row_mut(k0 + nb);
        let below = l.submatrix(k0 + nb, k0, d - k0 - nb, nb);
        gemm::sub_product(rest, below, solved.as_ref().subrows(k0, nb));
    }
    for &(k0, nb) in blocks.iter().rev() {
        let diag = l.submatrix(k0, k0, nb, nb);
        diag.transpose()
            .solve_upper_triangular_in_place(w.as_mut().subrows_mut(k0, nb));
        let (before, solved) = w.as_mut().split_at_row_mut(k0);
        let left = l.submatrix(k0, 0, nb, k0).transpose();
        gemm::sub_product(before, left, solved.as_ref().subrows(0, nb));
    }
}

/// W = Xc^T K^-1 Yc for the regularised kernel K = Xc Xc^T + lambda I (lower triangle), row-major. With n < d the
/// cost is the products: Z = K^-1 Xc is solved for the narrower side (d_src right-hand sides rather than d_tgt)
/// by the blocked substitution, and W^T = Yc^T Z follows. The f32 result is checked end to end
/// (`dual_prediction_error`); above F32_SOLVE_TOL, or when K is not positive definite in f32, W comes from an
/// f64 factorisation. None when K is not positive definite in f64.
fn dual_weight(
    k: &Mat<f32>,
    xc: Shifted<'_>,
    yc: Shifted<'_>,
    lambda: f64,
) -> Option<(Matrix, Option<f64>)> {
    if let Ok(llt) = k.llt(Side::Lower) {
        let mut z = xc.to_mat();
        cholesky_solve_in_place(llt.L(), z.as_mut());
        let w = product_row_major(z.transpose().into(), yc);
        let err = dual_prediction_error(&llt, k, xc, yc, &w, lambda);
        if err.is_finite() && err <= F32_SOLVE_TOL {
            return Some((w, Some(err)));
        }
    }
    let a = solve_spd_f64(&to_f64(k.as_ref()), &to_f64(yc.to_mat().as_ref()))?;
    Some((product_row_major(xc.transpose(), a.as_ref().into()), None))
}

/// a b as a row-major Matrix: b^T a^T written column-major is a b's row-major storage, so nothing is transposed.
fn product_row_major(a: Shifted<'_>, b: Shifted<'_>) -> Matrix {
    let (rows, cols) = (a.m.nrows(), b.m.ncols());
    let mut out = vec![0f32; rows * cols];
    gemm::product_into(
        MatMut::from_column_major_slice_mut(&mut out, cols, rows),
        b.transpose(),
        a.transpose(),
    );
    Matrix::new(rows, cols, out)
}

/// Relative error of the dual W's predictions on the training rows, Xc W s, for random probes s against a
/// reference in f64: a = K^-1 Yc s from the f32 factor with one step of iterative refinement (residual in f64),
/// whose predictions are Xc Xc^T a = (K - lambda I) a. It measures everything the f32 path did (factor,
/// inverse, both products) where the map is used, not along directions the data never visits.
fn dual_prediction_error(
    llt: &Llt<f32>,
    k: &Mat<f32>,
    xc: Shifted<'_>,
    yc: Shifted<'_>,
    w: &Matrix,
    lambda: f64,
) -> f64 {
    let probes = random_probes(yc.m.ncols());
    let r = times_f64(yc, probes.as_ref());
    let a0 = to_f64(llt.solve(to_f32(r.as_ref())).as_ref());
    let res = &r - sym_lower_times(k.as_ref(), a0.as_ref());
    let a = &a0 + to_f64(llt.solve(to_f32(res.as_ref())).as_ref());
    let reference = sym_lower_times(k.as_ref(), a.as_ref()) - &a * faer::Scale(lambda);
    let ws = times_f64(row_major(w).into(), probes.as_ref());
    let ours = times_f64(xc, ws.as_ref());
    worst_ratio(
        &col_norms((&ours - &reference).as_ref()),
        &col_norms(reference.as_ref()),
    )
}

/// Random probe directions for the a-posteriori checks: a few suffice, since a solve that lost accuracy loses it
/// along almost every direction.
const PROBES: usize = 3;

fn random_probes(dim: usize) -> Mat<f64> {
    let mut rng = crate::rng::SplitMix64::new(0x5EED);
    Mat::from_fn(dim, PROBES, |_, _| rng.normal())
}

/// Largest ratio of norms, error over reference (the error's own norm where the reference is zero).
fn worst_ratio(err: &[f64], reference: &[f64]) -> f64 {
    err.iter()
        .zip(reference)
        .map(|(e, r)| if *r > 0.0 { e / r } else { *e })
        .fold(0f64, f64::max)
}

fn col_norms(m: MatRef<'_, f64>) -> Vec<f64> {
    (0..m.ncols()).map(|k| m.col(k).norm_l2()).collect()
}

/// m s in f64 arithmetic for a few columns s, reading m along its contiguous axis. The shift enters as a
/// rank-one correction: (m - 1 c^T) s = m s - 1 (c^T s) and (m - r 1^T) s = m s - r (1^T s).
fn times_f64(m: Shifted<'_>, s: MatRef<'_, f64>) -> Mat<f64> {
    let (rows, cols, p) = (m.m.nrows(), m.m.ncols(), s.ncols());
    let mut out = Mat::<f64>::zeros(rows, p);
    let probes: Vec<Vec<f64>> = (0..p).map(|k| s.col(k).iter().copied().collect()).collect();
    if m.m.col_stride() == 1 {
        for i in 0..rows {
            let row = m.m.row(i).try_as_row_major().expect("row-major").as_slice();
            for (k, probe) in probes.iter().enumerate() {
                out[(i, k)] = dot_f64(row, probe);
            }
        }
    } else {
        for j in 0..cols {
            let col = m.m.col(j);
            for (k, probe) in probes.iter().enumerate() {
                let (sjk, out_k) = (probe[j], out.col_mut(k).try_as_col_major_mut());
                let out_k = out_k
                    .expect("owned matrices are column-major")
                    .as_slice_mut();
                for (o, v) in out_k.iter_mut().zip(col.iter()) {
                    *o += *v as f64 * sjk;
                }
            }
        }
    }
    match m.shift {
        Shift::None => {}
        Shift::Cols(c) => {
            for (k, probe) in probes.iter().enumerate() {
                let correction: f64 = c.iter().zip(probe).map(|(c, s)| *c as f64 * s).sum();
                (0..rows).for_each(|i| out[(i, k)] -= correction);
            }
        }
        Shift::Rows(r) => {
            for (k, probe) in probes.iter().enumerate() {
                let sum: f64 = probe.iter().sum();
                (0..rows).for_each(|i| out[(i, k)] -= r[i] as f64 * sum);
            }
        }
    }
    out
}

/// An f32 row against an f64 vector, in eight independent lanes so that the sum vectorises.
fn dot_f64(a: &[f32], b: &[f64]) -> f64 {
    let mut lanes = [0f64; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| *x as f64 * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] as f64 * y[l];
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// G v in f64 for symmetric G given by its lower triangle.
fn sym_lower_times(g: MatRef<'_, f32>, v: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(g.nrows(), v.ncols());
    for j in 0..g.ncols() {
        for k in 0..v.ncols() {
            out[(j, k)] += g[(j, j)] as f64 * v[(j, k)];
        }
        for i in j + 1..g.nrows() {
            let gij = g[(i, j)] as f64;
            for k in 0..v.ncols() {
                out[(i, k)] += gij * v[(j, k)];
                out[(j, k)] += gij * v[(i, k)];
            }
        }
    }
    out
}

/// a v for an f32 operand and an f64 vector, through the f32 product.
fn mat_vec(a: Shifted<'_>, v: &[f64]) -> Vec<f64> {
    let v32 = Mat::<f32>::from_fn(v.len(), 1, |i, _| v[i] as f32);
    let out = gemm::product(a, v32.as_ref());
    (0..out.nrows()).map(|i| out[(i, 0)] as f64).collect()
}

/// g += lambda I
fn add_ridge(g: &mut Mat<f32>, lambda: f64) {
    for k in 0..g.nrows() {
        g[(k, k)] = (g[(k, k)] as f64 + lambda) as f32;
    }
}

/// m += s * a b^T
fn add_outer(m: &mut Mat<f64>, s: f64, a: &[f64], b: &[f64]) {
    for (j, bj) in b.iter().enumerate() {
        for (i, ai) in a.iter().enumerate() {
            m[(i, j)] += s * ai * bj;
        }
    }
}

fn check_solution(w: &Matrix, form: Form, lambda: f64) -> Result<()> {
    if w.data.iter().any(|v| !v.is_finite()) {
        return Err(singular(form, lambda));
    }
    Ok(())
}

/// Orthogonal Procrustes with a least-squares scale: W = s U V^T from the SVD of Xc^T Yc, s = sum(sigma) /
/// ||Xc||_F^2. When d_src != d_tgt, U V^T is semi-orthogonal (orthonormal rows or columns).
pub fn fit_procrustes(x: &Matrix, y: &Matrix, fit_intercept: bool) -> Result<AffineMap> {
    let (mut xm, mut ym) = check_pair(x, y)?;
    if !fit_intercept {
        xm.fill(0.0);
        ym.fill(0.0);
    }
    let (xct, yct) = (centered_t(x, &xm), centered_t(y, &ym));
    // In f64: U V^T along weak singular directions is sensitive to rounding in Xc^T Yc.
    let m = to_f64(xct.as_ref()) * to_f64(yct.as_ref()).transpose();
    let svd = m.thin_svd().map_err(|_| AvbError::Singular {
        what: "procrustes SVD".into(),
        detail: "the SVD did not converge".into(),
        fix: "check the inputs for extreme values".into(),
    })?;
    let r = svd.U() * svd.V().transpose();
    let s = svd.S().column_vector();
    let sigma_sum: f64 = (0..s.nrows()).map(|i| s[i]).sum();
    let xnorm2: f64 = xct.data.iter().map(|v| (*v as f64).powi(2)).sum();
    if xnorm2 == 0.0 {
        return Err(AvbError::Singular {
            what: "procrustes".into(),
            detail: "the centred source matrix is zero".into(),
            fix: "pass more than one distinct source row".into(),
        });
    }
    let scale = sigma_sum / xnorm2;
    let weight = to_row_major(to_f32((r * faer::Scale(scale)).as_ref()).as_ref());
    let bias = intercept(&xm, &ym, &weight);
    Ok(AffineMap { weight, bias })
}

/// Mean over folds of the variance-weighted held-out R^2 of ridge at every lambda in `grid`. `fold[i]` in
/// 0..k assigns row i to a fold. Per fold: one eigendecomposition (of X^T X in the primal form, of X X^T in the
/// dual form) gives the validation error at every lambda in O(r^2) through precomputed quadratic forms.
#[allow(clippy::too_many_arguments)]
pub fn cross_validate(
    x: &Matrix,
    y: &Matrix,
    fold: &[usize],
    k: usize,
    grid: &[f64],
    form: Form,
    fit_intercept: bool,
    on_fold_done: &mut dyn FnMut(usize),
) -> Result<Vec<f64>> {
    check_pair(x, y)?;
    if !fit_intercept {
        return Err(AvbError::Invalid(
            "cross-validation is implemented for maps with an intercept (the default)".into(),
        ));
    }
    if k < 2 || fold.len() != x.rows || fold.iter().any(|f| *f >= k) {
        return Err(AvbError::Invalid(format!(
            "cross-validation needs k >= 2 folds covering every row (k = {k})"
        )));
    }
    for l in grid {
        check_lambda(*l)?;
    }
    let mut total = vec![0f64; grid.len()];
    for f in 0..k {
        let tr: Vec<usize> = (0..x.rows).filter(|i| fold[*i] != f).collect();
        let va: Vec<usize> = (0..x.rows).filter(|i| fold[*i] == f).collect();
        if tr.len() < 2 || va.len() < 2 {
            return Err(AvbError::Invalid(format!(
                "fold {f} has {} training and {} validation rows; use fewer folds or more rows",
                tr.len(),
                va.len()
            )));
        }
        let scores = fold_scores(
            &x.select_rows(&tr),
            &y.select_rows(&tr),
            &x.select_rows(&va),
            &y.select_rows(&va),
            grid,
            form,
            fit_intercept,
        )?;
        for (t, s) in total.iter_mut().zip(scores) {
            *t += s;
        }
        on_fold_done(f);
    }
    Ok(total.iter().map(|t| t / k as f64).collect())
}

fn fold_scores(
    xt: &Matrix,
    yt: &Matrix,
    xv: &Matrix,
    yv: &Matrix,
    grid: &[f64],
    form: Form,
    fit_intercept: bool,
) -> Result<Vec<f64>> {
    let (xm, ym) = (
        column_means(xt, fit_intercept),
        column_means(yt, fit_intercept),
    );
    let (xtct, ytct) = (centered_t(xt, &xm), centered_t(yt, &ym));
    let (xtct, ytct) = (xtct.as_ref(), ytct.as_ref());
    let (xtc, ytc) = (xtct.transpose(), ytct.transpose());
    let xvc = to_f64(centered_t(xv, &xm).as_ref().transpose());
    let yvc = to_f64(centered_t(yv, &ym).as_ref().transpose());
    let eig_err = |_| AvbError::Singular {
        what: "cross-validation eigendecomposition".into(),
        detail: "did not converge".into(),
        fix: "check the inputs for extreme values".into(),
    };
    // Predictions on the validation rows are C diag(1 / (s + lambda)) A.
    let (c, a, s) = match form.resolve(xt.rows, xt.cols) {
        Form::Dual => {
            let kmat = to_f64(gemm::product(xtc, xtct).as_ref());
            let eig = kmat.self_adjoint_eigen(Side::Lower).map_err(eig_err)?;
            let u = eig.U().to_owned();
            let s: Vec<f64> = (0..u.ncols())
                .map(|i| eig.S().column_vector()[i].max(0.0))
                .collect();
            let a = u.transpose() * to_f64(ytc);
            let c = &xvc * to_f64(xtct) * &u;
            (c, a, s)
        }
        _ => {
            let g = to_f64(gemm::product(xtct, xtc).as_ref());
            let eig = g.self_adjoint_eigen(Side::Lower).map_err(eig_err)?;
            let v = eig.U().to_owned();
            let s: Vec<f64> = (0..v.ncols())
                .map(|i| eig.S().column_vector()[i].max(0.0))
                .collect();
            let a = v.transpose() * to_f64(gemm::product(xtct, ytc).as_ref());
            let c = &xvc * &v;
            (c, a, s)
        }
    };
    let r = s.len();
    let e = c.transpose() * &yvc;
    let m = c.transpose() * &c;
    let nmat = &a * a.transpose();
    let ea: Vec<f64> = (0..r)
        .map(|i| (0..a.ncols()).map(|j| e[(i, j)] * a[(i, j)]).sum())
        .collect();
    let yy: f64 = sum_sq(yvc.as_ref());
    // SST about the validation rows' own mean, as r2_score computes it.
    let vmean = column_means(yv, true);
    let sst: f64 = (0..yv.rows)
        .flat_map(|i| {
            yv.row(i)
                .iter()
                .zip(&vmean)
                .map(|(v, m)| (*v as f64 - m).powi(2))
                .collect::<Vec<_>>()
        })
        .sum();
    Ok(grid
        .iter()
        .map(|lambda| {
            let dvec: Vec<f64> = s.iter().map(|s| 1.0 / (s + lambda)).collect();
            let cross: f64 = (0..r).map(|i| dvec[i] * ea[i]).sum();
            let mut quad = 0f64;
            for j in 0..r {
                let mut col = 0f64;
                for i in 0..r {
                    col += dvec[i] * m[(i, j)] * nmat[(i, j)];
                }
                quad += dvec[j] * col;
            }
            let sse = (yy - 2.0 * cross + quad).max(0.0);
            if sst > 0.0 {
                1.0 - sse / sst
            } else {
                f64::NAN
            }
        })
        .collect())
}

fn sum_sq(m: MatRef<'_, f64>) -> f64 {
    (0..m.ncols())
        .map(|j| (0..m.nrows()).map(|i| m[(i, j)] * m[(i, j)]).sum::<f64>())
        .sum()
}

/// Fit metrics of predictions against truth. `train_target_mean` is the mean the map was fitted around.
pub fn fit_metrics(pred: &Matrix, truth: &Matrix, train_target_mean: &[f64]) -> FitMetrics {
    let n = truth.rows;
    let mean_f32: Vec<f32> = train_target_mean.iter().map(|v| *v as f32).collect();
    let mut cos = Vec::with_capacity(n);
    let (mut ccos, mut bcos) = (0f64, 0f64);
    let (mut sse, mut sst) = (vec![0f64; truth.cols], vec![0f64; truth.cols]);
    let eval_mean = column_means(truth, true);
    for i in 0..n {
        let (p, t) = (pred.row(i), truth.row(i));
        cos.push(cosine(p, t));
        let pc: Vec<f32> = p.iter().zip(&mean_f32).map(|(a, b)| a - b).collect();
        let tc: Vec<f32> = t.iter().zip(&mean_f32).map(|(a, b)| a - b).collect();
        ccos += cosine(&pc, &tc);
        bcos += cosine(&mean_f32, t);
        for j in 0..truth.cols {
            sse[j] += (t[j] as f64 - p[j] as f64).powi(2);
            sst[j] += (t[j] as f64 - eval_mean[j]).powi(2);
        }
    }
    let (sse_t, sst_t): (f64, f64) = (sse.iter().sum(), sst.iter().sum());
    let r2_cols: Vec<f64> = sse
        .iter()
        .zip(&sst)
        .map(|(e, t)| {
            if *t > 0.0 {
                1.0 - e / t
            } else if *e == 0.0 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let nf = n.max(1) as f64;
    FitMetrics {
        n,
        mean_cosine: cos.iter().sum::<f64>() / nf,
        mean_centered_cosine: ccos / nf,
        mean_baseline_cosine: bcos / nf,
        r2_variance_weighted: if sst_t > 0.0 {
            1.0 - sse_t / sst_t
        } else {
            f64::NAN
        },
        r2_uniform: r2_cols.iter().sum::<f64>() / r2_cols.len().max(1) as f64,
        cosine_quantiles: [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]
            .iter()
            .map(|q| quantile(&cos, *q))
            .collect(),
    }
}

/// Per-row cosine between predictions and truth.
pub fn row_cosines(pred: &Matrix, truth: &Matrix) -> Vec<f64> {
    (0..truth.rows)
        .map(|i| cosine(pred.row(i), truth.row(i)))
        .collect()
}

/// numpy's default (linear) quantile.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = q * (s.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(s.len() - 1);
    s[lo] + (pos - lo as f64) * (s[hi] - s[lo])
}

/// Column means of the target rows a map was fitted on (needed for centred metrics).
pub fn target_mean(y: &Matrix) -> Vec<f64> {
    column_means(y, true)
}
