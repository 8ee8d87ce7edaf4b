//! Concept directions with known labels: for a labelled group of texts, the mean activation of the group
//! minus the mean over the whole corpus, L2-normalised. They give features with ground truth for models that
//! have no SAE, and let a map be checked concept by concept.

use crate::error::{AvbError, Result};
use crate::matrix::Matrix;
use crate::washout::normalize;

/// One direction per group (rows of `acts` listed in each group), in group order.
pub fn concept_directions(acts: &Matrix, groups: &[Vec<usize>]) -> Result<Matrix> {
    acts.check_nonempty("activations")?;
    acts.check_finite("activations")?;
    let mut corpus_mean = vec![0f64; acts.cols];
    for i in 0..acts.rows {
        for (m, v) in corpus_mean.iter_mut().zip(acts.row(i)) {
            *m += *v as f64 / acts.rows as f64;
        }
    }
    let mut out = Vec::with_capacity(groups.len() * acts.cols);
    for (g, rows) in groups.iter().enumerate() {
        if rows.is_empty() || rows.iter().any(|r| *r >= acts.rows) {
            return Err(AvbError::Invalid(format!(
                "concept group {g} is empty or names a row outside 0..{}",
                acts.rows
            )));
        }
        let mut diff = vec![0f64; acts.cols];
        for r in rows {
            for (d, v) in diff.iter_mut().zip(acts.row(*r)) {
                *d += *v as f64 / rows.len() as f64;
            }
        }
        let diff: Vec<f32> = diff
            .iter()
            .zip(&corpus_mean)
            .map(|(a, m)| (a - m) as f32)
            .collect();
        out.extend(normalize(&diff).ok_or_else(|| {
            AvbError::Invalid(format!(
                "concept group {g} has the corpus mean as its mean: no direction"
            ))
        })?);
    }
    Ok(Matrix::new(groups.len(), acts.cols, out))
}
