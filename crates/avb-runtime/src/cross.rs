//! The cross-model step on the device: feature directions through a ridge map's linear part and, for the
//! cross-washout condition, the washout blend normalize(normalize(m) + w b). The arithmetic is avb-core's
//! `AffineMap::apply(.., false)` and `washout::mix` (the host planner's), written as tensor ops so that a page
//! runs it on the GPU beside the verbalizer; tests hold the two paths equal.

use avb_core::matrix::Matrix;
use avb_core::ridge::AffineMap;
use avb_core::{AvbError, Result};
use burn::tensor::{Device, Tensor, TensorData};

/// A ridge map's weight (and optionally the target's washout vector) held on a device.
pub struct DeviceMap {
    /// [d_src, d_tgt]
    weight: Tensor<2>,
    /// [1, d_tgt]
    washout: Option<Tensor<2>>,
    d_src: usize,
    d_tgt: usize,
}

impl DeviceMap {
    pub fn new(map: &AffineMap, washout: Option<&[f32]>, device: &Device) -> Result<DeviceMap> {
        let (d_src, d_tgt) = (map.d_src(), map.d_tgt());
        let washout = match washout {
            Some(b) if b.len() != d_tgt => {
                return Err(AvbError::dimension(
                    "washout vector",
                    format!("{} values, the map's target has d = {d_tgt}", b.len()),
                    "use the washout vector of the model and layer the map targets",
                ))
            }
            Some(b) => Some(Tensor::from_data(
                TensorData::new(b.to_vec(), [1, d_tgt]),
                device,
            )),
            None => None,
        };
        Ok(DeviceMap {
            weight: Tensor::from_data(
                TensorData::new(map.weight.data.clone(), [d_src, d_tgt]),
                device,
            ),
            washout,
            d_src,
            d_tgt,
        })
    }

    pub fn d_src(&self) -> usize {
        self.d_src
    }

    pub fn d_tgt(&self) -> usize {
        self.d_tgt
    }

    /// The vectors a verbalizer reads for `directions` ([rows, d_src], decoder rows in the source space), as a
    /// [rows, d_tgt] device tensor: mapped directions, or with `washout_weight` the washout blend of each. Read
    /// them back through [`checked_rows`].
    pub fn vectors(&self, directions: &Matrix, washout_weight: Option<f64>) -> Result<Tensor<2>> {
        if directions.cols != self.d_src {
            return Err(AvbError::dimension(
                "applying a map",
                format!(
                    "inputs have d = {} but the map expects d_src = {}",
                    directions.cols, self.d_src
                ),
                "use a map fitted FROM the space these vectors live in (check the source model and layer)",
            ));
        }
        let device = self.weight.device();
        let x: Tensor<2> = Tensor::from_data(
            TensorData::new(directions.data.clone(), [directions.rows, self.d_src]),
            &device,
        );
        let mapped = crate::kernels::matmul(x, self.weight.clone());
        let Some(w) = washout_weight else {
            return Ok(mapped);
        };
        let washout = self.washout.as_ref().ok_or_else(|| {
            AvbError::Invalid("condition cross-washout needs a washout vector (--washout)".into())
        })?;
        if !w.is_finite() {
            return Err(AvbError::Invalid(format!(
                "washout weight must be finite, got {w}"
            )));
        }
        let unit = |v: Tensor<2>| {
            let n = v.clone().square().sum_dim(1).sqrt();
            v / n
        };
        Ok(unit(unit(mapped) + washout.clone() * (w as f32)))
    }
}

/// Host rows of a [`DeviceMap::vectors`] read-back ([rows * d] values), refusing what the host blend refuses: a
/// zero direction (or a blend that cancels) divides by zero on the device and arrives non-finite.
pub fn checked_rows(values: Vec<f32>, d: usize) -> Result<Vec<Vec<f32>>> {
    if d == 0 || values.len() % d != 0 {
        return Err(AvbError::Invalid(format!(
            "{} mapped values are not rows of d = {d}",
            values.len()
        )));
    }
    values
        .chunks(d)
        .enumerate()
        .map(|(row, v)| {
            if v.iter().all(|x| x.is_finite()) {
                Ok(v.to_vec())
            } else {
                Err(AvbError::Invalid(format!(
                    "direction {row} maps to a zero or non-finite vector (or its washout blend cancels to zero); it cannot be verbalized. Fix: check the feature row, or use another washout weight."
                )))
            }
        })
        .collect()
}
