//! GGML tensor types and their dequantization to f32, following the block layouts llama.cpp defines (ggml-common.h):
//! a row of a quantized tensor is a sequence of fixed-size blocks, each holding f16 scales and packed integers.

/// GGML tensor types avbridge reads (ids as stored in GGUF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// Bytes of `n` elements; None unless n is a multiple of the block size and the size fits in u64.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let (be, bb) = self.block();
        if n % be as u64 != 0 {
            return None;
        }
        (n / be as u64).checked_mul(bb as u64)
    }
}

fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) packed in the 12 `scales` bytes of Q4_K / Q5_K.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        (
            ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as f32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as f32,
        )
    }
}

/// Dequantize whole blocks of `ty` from `src` into `out` (cleared first).
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut Vec<f32>) {
    out.clear();
    let (be, bb) = ty.block();
    out.reserve(src.len() / bb * be);
    for b in src.chunks_exact(bb) {
        match ty {
            GgmlType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => out.push(f16(b, 0)),
            GgmlType::BF16 => out.push(half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            GgmlType::Q4_0 => {
                let d = f16(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|q| ((q & 0xF) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|q| ((q >> 4) as i32 - 8) as f32 * d));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16(b, 0), f16(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|q| (q & 0xF) as f32 * d + m));
                out.extend(qs.iter().map(|q| (q >> 4) as f32 * d + m));
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let (d, m, hi_at) = if ty == GgmlType::Q5_0 {
                    (f16(b, 0), None, 2)
                } else {
                    (f16(b, 0), Some(f16(b, 2)), 4)
                };
                let qh = u32::from_le_bytes(b[hi_at..hi_at + 4].try_into().unwrap());
                let qs = &b[hi_at + 4..hi_at + 20];
                let value = |q: u32| match m {
                    None => (q as i32 - 16) as f32 * d,
                    Some(m) => q as f32 * d + m,
                };
                out.extend(
                    qs.iter()
                        .enumerate()
                        .map(|(j, q)| value((q & 0xF) as u32 | ((qh >> j) & 1) << 4)),
                );
                out.extend(
                    qs.iter()
                        .enumerate()
                        .map(|(j, q)| value((q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4)),
                );
            }
            GgmlType::Q8_0 => {
                let d = f16(b, 0);
                out.extend(b[2..34].iter().map(|q| *q as i8 as f32 * d));
            }
            GgmlType::Q4K => {
                let (d, dmin) = (f16(b, 0), f16(b, 2));
                let (scales, qs) = (&b[4..16], &b[16..144]);
                for (j, q) in qs.chunks_exact(32).enumerate() {
                    let (s1, m1) = scale_min_k4(2 * j, scales);
                    let (s2, m2) = scale_min_k4(2 * j + 1, scales);
                    out.extend(q.iter().map(|v| d * s1 * (v & 0xF) as f32 - dmin * m1));
                    out.extend(q.iter().map(|v| d * s2 * (v >> 4) as f32 - dmin * m2));
                }
            }
            GgmlType::Q5K => {
                let (d, dmin) = (f16(b, 0), f16(b, 2));
                let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
                for (j, q) in qs.chunks_exact(32).enumerate() {
                    let (s1, m1) = scale_min_k4(2 * j, scales);
                    let (s2, m2) = scale_min_k4(2 * j + 1, scales);
                    let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                    out.extend(q.iter().zip(qh).map(|(v, h)| {
                        d * s1 * ((v & 0xF) + if h & u1 != 0 { 16 } else { 0 }) as f32 - dmin * m1
                    }));
                    out.extend(q.iter().zip(qh).map(|(v, h)| {
                        d * s2 * ((v >> 4) + if h & u2 != 0 { 16 } else { 0 }) as f32 - dmin * m2
                    }));
                }
            }
            GgmlType::Q6K => {
                let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16(b, 208));
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                    let mut y = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * sc[is] as i8 as f32 * q1 as f32;
                        y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                        y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                        y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
                    }
                    out.extend_from_slice(&y);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GgmlType;

    /// Found by the header fuzzer: a GGUF declaring ~2^64 elements made the byte count overflow.
    #[test]
    fn byte_counts_that_overflow_are_refused() {
        assert_eq!(GgmlType::Q8_0.bytes_for(32 * (u64::MAX / 32)), None);
        assert_eq!(GgmlType::Q8_0.bytes_for(64), Some(68));
        assert_eq!(GgmlType::Q4K.bytes_for(100), None);
    }
}
