//! Evaluation statistics: feature-specific lift (and its random-control variant), Student-t and bootstrap
//! confidence intervals, one-sample t-test and Wilcoxon signed-rank p-values, following scipy's definitions
//! (`scipy.stats.t`, `ttest_1samp`, `wilcoxon` with its defaults, `bootstrap`) so results can be checked
//! against it. Special functions are evaluated in f64 to ~1e-14 relative.

use crate::error::{AvbError, Result};
use crate::matrix::{cosine, Matrix};
use crate::rng::SplitMix64;
use serde::Serialize;

// ---------- special functions ----------

/// ln Gamma(x) for x > 0 (Lanczos, g = 7, 9 terms; ~1e-15 relative).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection keeps the series in its accurate range.
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Keeps a Lentz denominator away from zero.
fn nonzero(v: f64) -> f64 {
    const TINY: f64 = 1e-300;
    if v.abs() < TINY {
        TINY
    } else {
        v
    }
}

/// Continued fraction for the incomplete beta (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / nonzero(1.0 - qab * x / qap);
    let mut h = d;
    // One Lentz step with partial numerator `aa`; returns the factor applied to h.
    let mut step = |aa: f64| {
        d = 1.0 / nonzero(1.0 + aa * d);
        c = nonzero(1.0 + aa / c);
        d * c
    };
    for m in 1..10_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        h *= step(m * (b - m) * x / ((qam + m2) * (a + m2)));
        let del = step(-(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)));
        h *= del;
        if (del - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// Regularised incomplete beta I_x(a, b).
pub fn beta_reg(a: f64, b: f64, x: f64) -> f64 {
    beta_reg_xy(a, b, x, 1.0 - x)
}

/// I_x(a, b) with y = 1 - x given separately, so callers that know y exactly keep its precision.
fn beta_reg_xy(a: f64, b: f64, x: f64, y: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if y <= 0.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * y.ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(b, a, y) / b
    }
}

/// Regularised upper incomplete gamma Q(a, x).
fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let ln_front = -x + a * x.ln() - ln_gamma(a);
    if x < a + 1.0 {
        // Series for P, then Q = 1 - P.
        let (mut ap, mut sum, mut del) = (a, 1.0 / a, 1.0 / a);
        for _ in 0..10_000 {
            ap += 1.0;
            del *= x / ap;
            sum += del;
            if del.abs() < sum.abs() * 1e-17 {
                break;
            }
        }
        1.0 - sum * ln_front.exp()
    } else {
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / 1e-300;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = 1.0 / nonzero(an * d + b);
            c = nonzero(b + an / c);
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-16 {
                break;
            }
        }
        ln_front.exp() * h
    }
}

/// Standard normal survival function P(Z > z).
pub fn norm_sf(z: f64) -> f64 {
    if z >= 0.0 {
        0.5 * gamma_q(0.5, z * z / 2.0)
    } else {
        1.0 - norm_sf(-z)
    }
}

pub fn norm_cdf(z: f64) -> f64 {
    norm_sf(-z)
}

fn norm_pdf(z: f64) -> f64 {
    (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// Student t survival function P(T > t) with `df` degrees of freedom.
pub fn t_sf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * beta_reg_xy(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t));
    if t >= 0.0 {
        tail
    } else {
        1.0 - tail
    }
}

fn t_pdf(t: f64, df: f64) -> f64 {
    (ln_gamma((df + 1.0) / 2.0)
        - ln_gamma(df / 2.0)
        - 0.5 * (df * std::f64::consts::PI).ln()
        - (df + 1.0) / 2.0 * (1.0 + t * t / df).ln())
    .exp()
}

/// Invert a continuous, increasing cdf by bisection on a bracket, then Newton steps.
fn invert(p: f64, cdf: impl Fn(f64) -> f64, pdf: impl Fn(f64) -> f64) -> f64 {
    let (mut lo, mut hi) = (-1.0, 1.0);
    while cdf(lo) > p {
        lo *= 2.0;
    }
    while cdf(hi) < p {
        hi *= 2.0;
    }
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if cdf(mid) < p {
            lo = mid
        } else {
            hi = mid
        }
    }
    let mut x = 0.5 * (lo + hi);
    for _ in 0..4 {
        let step = (cdf(x) - p) / pdf(x);
        if !step.is_finite() {
            break;
        }
        x -= step;
    }
    x
}

/// Quantile of Student t (`scipy.stats.t.ppf`).
pub fn t_ppf(p: f64, df: f64) -> f64 {
    if p == 0.5 {
        return 0.0;
    }
    if p > 0.5 {
        // Work in the upper tail for precision.
        return -t_ppf(1.0 - p, df);
    }
    invert(p, |x| t_sf(-x, df), |x| t_pdf(x, df))
}

/// Quantile of the standard normal (`scipy.special.ndtri`).
pub fn norm_ppf(p: f64) -> f64 {
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    if p > 0.5 {
        return -norm_ppf(1.0 - p);
    }
    invert(p, norm_cdf, norm_pdf)
}

// ---------- tests and intervals ----------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Alternative {
    TwoSided,
    Greater,
    Less,
}

fn p_from_tails(sf_obs: f64, cdf_obs: f64, alt: Alternative) -> f64 {
    match alt {
        Alternative::TwoSided => (2.0 * sf_obs.min(cdf_obs)).min(1.0),
        Alternative::Greater => sf_obs,
        Alternative::Less => cdf_obs,
    }
}

pub fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// Sample standard deviation (ddof = 1).
pub fn sd(x: &[f64]) -> f64 {
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() as f64 - 1.0)).sqrt()
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TTest {
    pub statistic: f64,
    pub df: f64,
    pub pvalue: f64,
}

/// One-sample t-test of mean(x) against `popmean` (`scipy.stats.ttest_1samp`).
pub fn ttest_1samp(x: &[f64], popmean: f64, alt: Alternative) -> TTest {
    let n = x.len() as f64;
    let t = (mean(x) - popmean) / (sd(x) / n.sqrt());
    let df = n - 1.0;
    TTest {
        statistic: t,
        df,
        pvalue: p_from_tails(t_sf(t, df), t_sf(-t, df), alt),
    }
}

/// Confidence interval of the mean from Student t (`scipy.stats.t.interval(level, n-1, mean, sem)`).
pub fn t_interval(x: &[f64], level: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let (m, sem) = (mean(x), sd(x) / n.sqrt());
    let q = t_ppf(0.5 + level / 2.0, n - 1.0);
    (m - q * sem, m + q * sem)
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Wilcoxon {
    /// min(r+, r-) for two-sided, r+ otherwise (as scipy reports it).
    pub statistic: f64,
    pub pvalue: f64,
    /// `exact`, `permutation` or `asymptotic`: chosen as scipy's method='auto' chooses.
    pub method: String,
}

/// Average ranks of `v` (1-based) and the sizes of tie groups.
fn rank_average(v: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|a, b| v[*a].total_cmp(&v[*b]));
    let mut ranks = vec![0.0; v.len()];
    let mut ties = Vec::new();
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[idx[k]] = r;
        }
        ties.push(j - i + 1);
        i = j + 1;
    }
    (ranks, ties)
}

/// r+ of the nonzero entries of d (zeros dropped, Wilcoxon's convention).
fn r_plus_of(d: &[f64]) -> (f64, f64, Vec<usize>, usize) {
    let nz: Vec<f64> = d.iter().copied().filter(|v| *v != 0.0).collect();
    let (ranks, ties) = rank_average(&nz.iter().map(|v| v.abs()).collect::<Vec<_>>());
    let rp: f64 = nz
        .iter()
        .zip(&ranks)
        .filter(|(v, _)| **v > 0.0)
        .map(|(_, r)| r)
        .sum();
    let rm: f64 = nz
        .iter()
        .zip(&ranks)
        .filter(|(v, _)| **v < 0.0)
        .map(|(_, r)| r)
        .sum();
    (rp, rm, ties, nz.len())
}

/// Wilcoxon signed-rank test of x against zero, with scipy's defaults (zero_method='wilcox',
/// correction=False, method='auto': exact without ties or zeros for n <= 50, a full sign-flip enumeration for
/// n <= 13 with ties or zeros, otherwise the normal approximation with tie correction).
pub fn wilcoxon(x: &[f64], alt: Alternative) -> Result<Wilcoxon> {
    if x.iter().any(|v| !v.is_finite()) {
        return Err(AvbError::Invalid(
            "wilcoxon: NaN or Inf in the sample".into(),
        ));
    }
    let n_all = x.len();
    let (rp, rm, ties, count) = r_plus_of(x);
    if count == 0 {
        return Err(AvbError::Empty {
            what: "wilcoxon".into(),
            detail: "every difference is zero".into(),
            fix: "the test is undefined; report the lift as exactly zero".into(),
        });
    }
    let has_ties = ties.iter().any(|t| *t > 1);
    let has_zeros = count < n_all;
    let statistic = if alt == Alternative::TwoSided {
        rp.min(rm)
    } else {
        rp
    };
    let (pvalue, method) = if n_all <= 50 && !has_ties && !has_zeros {
        let pmf = signed_rank_pmf(count);
        let cdf = |k: f64| pmf.iter().take((k.max(-1.0) + 1.0) as usize).sum::<f64>();
        let sf = |k: f64| pmf.iter().skip(k.max(0.0) as usize).sum::<f64>();
        (p_from_tails(sf(rp.floor()), cdf(rp.ceil()), alt), "exact")
    } else if n_all <= 13 {
        // Every sign assignment is equally likely under H0: enumerate all 2^n.
        let total = 1usize << n_all;
        let gamma = (rp * 1e-14).abs();
        let (mut le, mut ge) = (0usize, 0usize);
        let mut flipped = x.to_vec();
        for mask in 0..total {
            for (i, v) in x.iter().enumerate() {
                flipped[i] = if mask >> i & 1 == 1 { -v } else { *v };
            }
            let r = r_plus_of(&flipped).0;
            le += (r <= rp + gamma) as usize;
            ge += (r >= rp - gamma) as usize;
        }
        (
            p_from_tails(ge as f64 / total as f64, le as f64 / total as f64, alt),
            "permutation",
        )
    } else {
        let c = count as f64;
        let mn = c * (c + 1.0) / 4.0;
        let tie = ties
            .iter()
            .map(|t| (*t as f64).powi(3) - *t as f64)
            .sum::<f64>();
        let se = ((c * (c + 1.0) * (2.0 * c + 1.0) - tie / 2.0) / 24.0).sqrt();
        let z = (rp - mn) / se;
        (p_from_tails(norm_sf(z), norm_cdf(z), alt), "asymptotic")
    };
    Ok(Wilcoxon {
        statistic,
        pvalue,
        method: method.into(),
    })
}

/// Null distribution of r+ for n untied nonzero values: P(T = s), s = 0..=n(n+1)/2.
fn signed_rank_pmf(n: usize) -> Vec<f64> {
    let max = n * (n + 1) / 2;
    let mut counts = vec![0f64; max + 1];
    counts[0] = 1.0;
    for r in 1..=n {
        for s in (r..=max).rev() {
            counts[s] += counts[s - r];
        }
    }
    let total = 2f64.powi(n as i32);
    counts.iter().map(|c| c / total).collect()
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Bootstrap {
    pub resamples: usize,
    pub seed: u64,
    pub percentile: (f64, f64),
    pub bca: (f64, f64),
}

/// Bootstrap CIs of the mean: percentile and BCa (bias-corrected and accelerated, jackknife acceleration),
/// resampling with the project's SplitMix64 so results are reproducible from the seed.
pub fn bootstrap_mean(x: &[f64], level: f64, resamples: usize, seed: u64) -> Bootstrap {
    let n = x.len();
    let theta = mean(x);
    let mut rng = SplitMix64::new(seed);
    let mut boot: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| x[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    boot.sort_by(f64::total_cmp);
    let alpha = (1.0 - level) / 2.0;
    let pct = |q: f64| crate::ridge::quantile(&boot, q);
    let below = boot.iter().filter(|b| **b < theta).count() as f64;
    let at_or_below = boot.iter().filter(|b| **b <= theta).count() as f64;
    let z0 = norm_ppf((below + at_or_below) / (2.0 * resamples as f64));
    let total: f64 = x.iter().sum();
    let jack: Vec<f64> = x.iter().map(|v| (total - v) / (n as f64 - 1.0)).collect();
    let jm = mean(&jack);
    let num: f64 = jack.iter().map(|j| (jm - j).powi(3)).sum();
    let den = 6.0 * jack.iter().map(|j| (jm - j).powi(2)).sum::<f64>().powf(1.5);
    let a = if den > 0.0 { num / den } else { 0.0 };
    let adj = |z: f64| norm_cdf(z0 + (z0 + z) / (1.0 - a * (z0 + z)));
    Bootstrap {
        resamples,
        seed,
        percentile: (pct(alpha), pct(1.0 - alpha)),
        bca: (pct(adj(norm_ppf(alpha))), pct(adj(norm_ppf(1.0 - alpha)))),
    }
}

// ---------- lift ----------

fn check_embeddings(what: &str, m: &Matrix, d: usize) -> Result<()> {
    m.check_nonempty(what)?;
    m.check_finite(what)?;
    if m.cols != d {
        return Err(AvbError::dimension(
            what,
            format!(
                "embedding width {} differs from the native explanations' {d}",
                m.cols
            ),
            "embed every condition with the same sentence embedder",
        ));
    }
    Ok(())
}

/// Feature-specific lift: lift_i = cos(C_i, B_i) - mean_{j != i} cos(C_i, B_j), for cross-condition
/// embeddings C and native embeddings B (row i = feature i in both).
pub fn lift(cross: &Matrix, native: &Matrix) -> Result<Vec<f64>> {
    check_embeddings("native explanation embeddings", native, native.cols)?;
    check_embeddings("cross explanation embeddings", cross, native.cols)?;
    if cross.rows != native.rows {
        return Err(AvbError::dimension(
            "lift",
            format!("{} cross rows but {} native rows", cross.rows, native.rows),
            "give one explanation per feature in each condition, in the same feature order",
        ));
    }
    if native.rows < 2 {
        return Err(AvbError::Empty {
            what: "lift".into(),
            detail: "one feature only".into(),
            fix: "lift compares each feature against the others: use at least 2 features".into(),
        });
    }
    let n = native.rows;
    Ok((0..n)
        .map(|i| {
            let own = cosine(cross.row(i), native.row(i));
            let others: f64 = (0..n)
                .filter(|j| *j != i)
                .map(|j| cosine(cross.row(i), native.row(j)))
                .sum();
            own - others / (n - 1) as f64
        })
        .collect())
}

/// Lift against random-direction controls: lift_i = cos(C_i, B_i) - mean_r cos(R_r, B_i), where R are
/// explanations of random directions pushed through the same path.
pub fn control_lift(cross: &Matrix, native: &Matrix, control: &Matrix) -> Result<Vec<f64>> {
    check_embeddings("native explanation embeddings", native, native.cols)?;
    check_embeddings("cross explanation embeddings", cross, native.cols)?;
    check_embeddings("control explanation embeddings", control, native.cols)?;
    if cross.rows != native.rows {
        return Err(AvbError::dimension(
            "control lift",
            format!("{} cross rows but {} native rows", cross.rows, native.rows),
            "give one explanation per feature in each condition, in the same feature order",
        ));
    }
    Ok((0..native.rows)
        .map(|i| {
            let own = cosine(cross.row(i), native.row(i));
            let ctrl: f64 = (0..control.rows)
                .map(|r| cosine(control.row(r), native.row(i)))
                .sum();
            own - ctrl / control.rows as f64
        })
        .collect())
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub sd: f64,
    pub ci_level: f64,
    pub t_ci: (f64, f64),
    pub ttest: TTest,
    pub ttest_greater: TTest,
    pub wilcoxon: Wilcoxon,
    pub bootstrap: Bootstrap,
}

/// Everything reported for a per-feature score: mean, CIs, tests against zero.
pub fn summarize(x: &[f64], level: f64, resamples: usize, seed: u64) -> Result<Summary> {
    if x.len() < 2 {
        return Err(AvbError::Empty {
            what: "summary statistics".into(),
            detail: format!("{} value(s)", x.len()),
            fix: "confidence intervals and tests need at least 2 features".into(),
        });
    }
    Ok(Summary {
        n: x.len(),
        mean: mean(x),
        sd: sd(x),
        ci_level: level,
        t_ci: t_interval(x, level),
        ttest: ttest_1samp(x, 0.0, Alternative::TwoSided),
        ttest_greater: ttest_1samp(x, 0.0, Alternative::Greater),
        wilcoxon: wilcoxon(x, Alternative::TwoSided)?,
        bootstrap: bootstrap_mean(x, level, resamples, seed),
    })
}
