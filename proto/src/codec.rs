//! Tensors on the wire: f32 activations to and from `bytes` in the message's [`Dtype`] (little-endian, row-major).

use bytes::Bytes;
use half::bf16;

use crate::v1::Dtype;

/// Encodes `values` as `dtype` (bf16 rounds to nearest even, as torch does).
///
/// # Panics
/// On `Dtype::Unspecified`: the caller chooses the dtype, so this is a bug, not bad input.
pub fn encode(values: &[f32], dtype: Dtype) -> Bytes {
    let size = dtype.size().expect("a concrete dtype");
    // Sized once and filled by fixed-width chunks, which the compiler vectorises (a per-element `put_*` is ~10× slower).
    let mut buf = vec![0u8; values.len() * size];
    match dtype {
        Dtype::Bf16 => {
            for (b, &v) in buf.chunks_exact_mut(2).zip(values) {
                b.copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
            }
        }
        Dtype::F32 => {
            for (b, &v) in buf.chunks_exact_mut(4).zip(values) {
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::Unspecified => unreachable!("checked above"),
    }
    Bytes::from(buf)
}

/// Decodes `bytes` of `dtype` into `out`, which must hold exactly `bytes.len() / size` values.
pub fn decode_into(bytes: &[u8], dtype: Dtype, out: &mut [f32]) -> Result<(), LengthMismatch> {
    combine(bytes, dtype, out, |o, v| *o = v)
}

/// Adds the decoded `bytes` of `dtype` to `out` element by element.
pub fn add_into(bytes: &[u8], dtype: Dtype, out: &mut [f32]) -> Result<(), LengthMismatch> {
    combine(bytes, dtype, out, |o, v| *o += v)
}

/// Decodes each value of `bytes` and hands it to `f` with its slot of `out` (inlined, so each use vectorises).
#[inline(always)]
fn combine(bytes: &[u8], dtype: Dtype, out: &mut [f32], f: impl Fn(&mut f32, f32)) -> Result<(), LengthMismatch> {
    let size = dtype.size().ok_or(LengthMismatch { bytes: bytes.len(), values: out.len(), size: 0 })?;
    if bytes.len() != out.len() * size {
        return Err(LengthMismatch { bytes: bytes.len(), values: out.len(), size });
    }
    match dtype {
        Dtype::Bf16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                f(o, f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16));
            }
        }
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                f(o, f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        Dtype::Unspecified => unreachable!("size() is None"),
    }
    Ok(())
}

/// A payload whose length does not match its element count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{bytes} bytes where {values} values of {size} bytes were expected")]
pub struct LengthMismatch {
    pub bytes: usize,
    pub values: usize,
    pub size: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let v = [0.0f32, -1.5, 3.25, 1e-3, f32::MAX, -0.0];
        let mut back = [0f32; 6];
        decode_into(&encode(&v, Dtype::F32), Dtype::F32, &mut back).expect("f32");
        assert_eq!(v.map(f32::to_bits), back.map(f32::to_bits));
        decode_into(&encode(&v, Dtype::Bf16), Dtype::Bf16, &mut back).expect("bf16");
        for (a, b) in v.iter().zip(&back) {
            assert_eq!(bf16::from_f32(*a).to_f32().to_bits(), b.to_bits());
        }
        let mut sum = [1f32; 6];
        add_into(&encode(&v, Dtype::F32), Dtype::F32, &mut sum).expect("add");
        assert_eq!(sum[2], 4.25);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut out = [0f32; 3];
        assert!(decode_into(&[0u8; 5], Dtype::Bf16, &mut out).is_err());
        assert!(decode_into(&[0u8; 12], Dtype::Unspecified, &mut out).is_err());
        assert!(decode_into(&[0u8; 12], Dtype::F32, &mut out).is_ok());
    }
}
