//! Background washout: b = mean of L2-normalised activations ("what the AV is used to seeing"), and the blend
//! mix(d, b, w) = normalize(normalize(d) + w * b) injected in place of a bare direction.

use crate::error::{AvbError, Result};
use crate::matrix::{norm, Matrix};

/// The washout vector of `rows` (each row L2-normalised, then averaged in f64) and its norm.
pub fn washout_vector(rows: &Matrix, what: &str) -> Result<(Vec<f32>, f64)> {
    rows.check_nonempty(what)?;
    rows.check_finite(what)?;
    let mut acc = vec![0f64; rows.cols];
    for i in 0..rows.rows {
        let r = rows.row(i);
        let n = norm(r);
        if n == 0.0 {
            return Err(AvbError::Invalid(format!(
                "{what}: row {i} is all zeros and has no direction. Fix: drop it (empty text or padding?) before computing a washout vector."
            )));
        }
        for (a, v) in acc.iter_mut().zip(r) {
            *a += *v as f64 / n;
        }
    }
    let inv = 1.0 / rows.rows as f64;
    let b: Vec<f32> = acc.iter().map(|a| (a * inv) as f32).collect();
    let bn = norm(&b);
    Ok((b, bn))
}

/// normalize(normalize(d) + w * b). Errors when d is zero or the blend cancels to zero.
pub fn mix(d: &[f32], b: &[f32], w: f64) -> Result<Vec<f32>> {
    if d.len() != b.len() {
        return Err(AvbError::dimension(
            "washout mix",
            format!(
                "direction has d = {} but the washout vector has d = {}",
                d.len(),
                b.len()
            ),
            "use a washout vector computed in the same (target) space as the mapped directions",
        ));
    }
    if !w.is_finite() {
        return Err(AvbError::Invalid(format!(
            "washout weight must be finite, got {w}"
        )));
    }
    let dn = norm(d);
    if dn == 0.0 || !dn.is_finite() {
        return Err(AvbError::Invalid(
            "cannot mix a zero or non-finite direction with the washout vector".into(),
        ));
    }
    let v: Vec<f64> = d
        .iter()
        .zip(b)
        .map(|(x, y)| *x as f64 / dn + w * *y as f64)
        .collect();
    let vn = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if vn < 1e-12 {
        return Err(AvbError::Invalid(format!(
            "direction + {w} * washout cancels to zero. Fix: use another washout weight."
        )));
    }
    Ok(v.iter().map(|x| (x / vn) as f32).collect())
}

/// v / ||v|| in f64, as f32.
pub fn normalize(v: &[f32]) -> Option<Vec<f32>> {
    let n = norm(v);
    (n > 0.0 && n.is_finite()).then(|| v.iter().map(|x| (*x as f64 / n) as f32).collect())
}
