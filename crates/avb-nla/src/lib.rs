//! avbridge's verbalizer layer: the NLA activation-verbalizer protocol and sidecar, zero-shot profiles for models
//! without a trained AV, the activation reconstructor, labelled concept groups, and the explain / evaluate
//! pipeline shared by the CLI and the browser.

pub mod concepts;
pub mod eval;
pub mod explain;
pub mod profiles;
pub mod protocol;
pub mod reconstructor;
pub mod sidecar;
pub mod verbalizer;

pub use sidecar::NlaMeta;
pub use verbalizer::{ExplainOptions, Explanation, Verbalizer};
