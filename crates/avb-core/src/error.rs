//! One error type for the core crate. Every variant names the thing at fault, the problem and the fix,
//! so a CLI can print it as-is.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AvbError {
    #[error("{path}: cannot read: {source}. Fix: check that the file exists and is readable.")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: truncated: {detail}. Fix: re-download or re-create the file (it was cut short)."
    )]
    Truncated { path: PathBuf, detail: String },
    #[error("{path}: corrupt: {detail}. Fix: re-create the file with `avb` or re-download it.")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: unsupported: {detail}")]
    Unsupported { path: PathBuf, detail: String },
    #[error("{path}: schema version {found} of `{schema}` is not supported (this avb reads versions up to {supported}). Fix: upgrade avb, or re-create the artifact with this version.")]
    SchemaVersion {
        path: PathBuf,
        schema: String,
        found: u32,
        supported: u32,
    },
    #[error("{path}: sha256 mismatch in {region}: expected {expected}, got {actual}. Fix: the file was modified or damaged; re-download or re-create it.")]
    HashMismatch {
        path: PathBuf,
        region: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: dimension mismatch: {detail}. Fix: {fix}")]
    Dimension {
        what: String,
        detail: String,
        fix: String,
    },
    #[error("{what}: non-finite value (NaN or Inf) at row {row}, column {col}. Fix: drop or repair that row before fitting; activations must be finite.")]
    NonFinite {
        what: String,
        row: usize,
        col: usize,
    },
    #[error("{what}: empty input ({detail}). Fix: {fix}")]
    Empty {
        what: String,
        detail: String,
        fix: String,
    },
    #[error("{what}: singular or non-positive-definite system ({detail}). Fix: {fix}")]
    Singular {
        what: String,
        detail: String,
        fix: String,
    },
    #[error("invalid argument: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, AvbError>;

impl AvbError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        AvbError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn corrupt(path: &Path, detail: impl Into<String>) -> Self {
        AvbError::Corrupt {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
    pub fn truncated(path: &Path, detail: impl Into<String>) -> Self {
        AvbError::Truncated {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
    pub fn unsupported(path: &Path, detail: impl Into<String>) -> Self {
        AvbError::Unsupported {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
    pub fn dimension(
        what: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        AvbError::Dimension {
            what: what.into(),
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}
