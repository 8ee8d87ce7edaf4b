//! avbridge core: artifact formats, ridge maps, washout, SAE/direction inputs and evaluation statistics.
//! No GPU and no model runtime: this crate also builds for wasm32 and serves the browser.

pub mod artifact;
pub mod directions;
pub mod error;
pub mod features;
pub mod gemm;
pub mod io;
pub mod matrix;
pub mod npy;
pub mod ridge;
pub mod rng;
pub mod safetensors;
pub mod stats;
pub mod washout;

pub use error::{AvbError, Result};
pub use matrix::Matrix;
