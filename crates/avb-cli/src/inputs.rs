//! Loading activation matrices for the CLI: avbridge activation sets (with model, layer and row ids), or plain
//! .npy / single-tensor safetensors matrices (the site then comes from flags).

use avb_core::artifact::{file_name, file_sha256, Artifact, Body, InputRef, Space};
use avb_core::io::FileSource;
use avb_core::safetensors::Header;
use avb_core::{npy, AvbError, Matrix, Result};
use std::path::Path;

pub struct Activations {
    pub matrix: Matrix,
    pub space: Space,
    pub pooling: String,
    pub row_ids: Vec<String>,
    pub input: InputRef,
}

/// Site flags used when the input file does not carry them.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SiteFlags {
    /// Model id, for inputs that do not record one (plain .npy / safetensors).
    #[arg(long)]
    pub model: Option<String>,
    /// Layer K (output of block K), for inputs that do not record one.
    #[arg(long)]
    pub layer: Option<u32>,
}

pub fn load_activations(
    path: &Path,
    model: Option<&str>,
    layer: Option<u32>,
) -> Result<Activations> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let (matrix, art_meta, input) = match ext {
        "npy" => {
            let src = FileSource::open(path)?;
            let (r, c, v) = npy::read_all(&src)?;
            let input = InputRef {
                file: file_name(path),
                sha256: file_sha256(path)?,
            };
            (Matrix::new(r, c, v), None, input)
        }
        "safetensors" => {
            let src = FileSource::open(path)?;
            let header = Header::read(&src)?;
            if header.metadata.contains_key(avb_core::artifact::METADATA_KEY) {
                let art = Artifact::open(path)?;
                let Body::ActivationSet(m) = art.meta.body.clone() else {
                    return Err(AvbError::unsupported(
                        path,
                        format!("expected an activation_set artifact, got `{}`", art.meta.body.kind()),
                    ));
                };
                (art.read_matrix("activations")?, Some(m), art.input_ref())
            } else {
                let two_d: Vec<_> = header.tensors.iter().filter(|(_, t)| t.shape.len() == 2 && t.dtype.is_float()).collect();
                let [(name, info)] = two_d.as_slice() else {
                    return Err(AvbError::unsupported(path, "a plain safetensors activation file must hold exactly one 2-D float tensor"));
                };
                let v = avb_core::safetensors::read_rows(&src, info, 0, info.shape[0])?;
                let _ = name;
                let input = InputRef {
                    file: file_name(path),
                    sha256: file_sha256(path)?,
                };
                (Matrix::new(info.shape[0], info.shape[1], v), None, input)
            }
        }
        _ => {
            return Err(AvbError::unsupported(
                path,
                "activations must be an avbridge activation set (.safetensors), a [n, d] .npy or a single-tensor .safetensors",
            ))
        }
    };
    let what = format!("activations {}", path.display());
    matrix.check_nonempty(&what)?;
    matrix.check_finite(&what)?;
    Ok(match art_meta {
        Some(m) => {
            if let Some(flag) = model.filter(|f| *f != m.space.model) {
                return Err(AvbError::Invalid(format!(
                    "{}: --model {flag} contradicts the artifact's model `{}`. Fix: drop the flag.",
                    path.display(),
                    m.space.model
                )));
            }
            Activations {
                matrix,
                space: m.space,
                pooling: m.pooling,
                row_ids: m.row_ids,
                input,
            }
        }
        None => Activations {
            space: Space {
                model: model.unwrap_or("unknown").to_string(),
                layer,
                d: matrix.cols,
            },
            pooling: "unknown".into(),
            row_ids: (0..matrix.rows).map(|i| format!("row-{i}")).collect(),
            matrix,
            input,
        },
    })
}
