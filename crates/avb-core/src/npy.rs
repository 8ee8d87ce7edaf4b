//! NumPy `.npy` (format versions 1-3): little-endian f2/f4/f8 arrays of 1 or 2 dimensions, C order.
//! Row reads use offsets, so a large direction file is never read whole.

use crate::error::{AvbError, Result};
use crate::io::RangeSource;
use crate::safetensors::{decode_f32, Dtype, TensorInfo};

/// Parse the header and describe the array as a tensor (same shape as safetensors' TensorInfo).
pub fn read_header(src: &dyn RangeSource) -> Result<TensorInfo> {
    let path = src.name();
    if src.len() < 10 {
        return Err(AvbError::truncated(
            path,
            format!("{} bytes, shorter than an .npy preamble", src.len()),
        ));
    }
    let pre = src.read_vec(0, 10)?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(AvbError::corrupt(
            path,
            "missing the \\x93NUMPY magic (not an .npy file)",
        ));
    }
    let (hlen, hstart) = match pre[6] {
        1 => (u16::from_le_bytes([pre[8], pre[9]]) as u64, 10u64),
        2 | 3 => {
            let b = src.read_vec(8, 4)?;
            (u32::from_le_bytes(b.try_into().unwrap()) as u64, 12u64)
        }
        v => {
            return Err(AvbError::unsupported(
                path,
                format!(".npy format version {v} (avb reads 1, 2 and 3)"),
            ))
        }
    };
    if hstart + hlen > src.len() {
        return Err(AvbError::truncated(
            path,
            format!(".npy header claims {hlen} bytes but the file ends first"),
        ));
    }
    let header = String::from_utf8(src.read_vec(hstart, hlen as usize)?)
        .map_err(|_| AvbError::corrupt(path, ".npy header is not text"))?;
    let descr = dict_value(&header, "descr")
        .ok_or_else(|| AvbError::corrupt(path, ".npy header has no 'descr'"))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let dtype = match descr {
        "<f4" => Dtype::F32,
        "<f2" => Dtype::F16,
        "<f8" => Dtype::F64,
        other => {
            return Err(AvbError::unsupported(
                path,
                format!(".npy dtype `{other}`; avb reads little-endian float16/32/64 (save with arr.astype('<f4'))"),
            ))
        }
    };
    let fortran = dict_value(&header, "fortran_order")
        .ok_or_else(|| AvbError::corrupt(path, ".npy header has no 'fortran_order'"))?;
    if fortran.trim() != "False" {
        return Err(AvbError::unsupported(
            path,
            "Fortran-ordered .npy array; save it with np.ascontiguousarray(arr)",
        ));
    }
    let shape_s = dict_value(&header, "shape")
        .ok_or_else(|| AvbError::corrupt(path, ".npy header has no 'shape'"))?;
    let shape: Vec<usize> = shape_s
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>().map_err(|_| {
                AvbError::corrupt(
                    path,
                    format!(".npy shape `{shape_s}` is not a tuple of integers"),
                )
            })
        })
        .collect::<Result<_>>()?;
    if shape.is_empty() || shape.len() > 2 {
        return Err(AvbError::unsupported(
            path,
            format!(
                ".npy array of shape {shape:?}; avb reads 1-D vectors and 2-D [rows, d] matrices"
            ),
        ));
    }
    let start = hstart + hlen;
    let bytes = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
    let end = start + bytes;
    if end > src.len() {
        return Err(AvbError::truncated(
            path,
            format!(
                "shape {shape:?} needs {bytes} data bytes but only {} are present",
                src.len() - start
            ),
        ));
    }
    if end < src.len() {
        return Err(AvbError::corrupt(
            path,
            format!("{} trailing bytes after the array data", src.len() - end),
        ));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        start,
        end,
    })
}

/// The raw text of `'key': value` in the header's Python dict literal.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header.find(&format!("'{key}'"))?;
    let rest = header[pos + key.len() + 2..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find([',', '}'])?
    };
    Some(&rest[..end])
}

/// Read a whole .npy array as f32 (rows, cols, values); 1-D arrays are one row.
pub fn read_all(src: &dyn RangeSource) -> Result<(usize, usize, Vec<f32>)> {
    let info = read_header(src)?;
    let (rows, cols) = info.rows_cols().unwrap_or((0, 0));
    let bytes = src.read_vec(info.start, (info.end - info.start) as usize)?;
    let mut out = Vec::new();
    decode_f32(info.dtype, &bytes, &mut out);
    Ok((rows, cols, out))
}

/// Serialise a [rows, cols] f32 matrix as a version-1 .npy file.
pub fn to_bytes(rows: usize, cols: usize, values: &[f32]) -> Vec<u8> {
    let mut dict =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    out
}
