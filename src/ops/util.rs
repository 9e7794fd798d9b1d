//! Shared validation and CPU storage helpers for the ops.

use crate::{Error, Result};
use candle_core::{CpuStorage, DType, Device, Layout, Tensor};
use half::{bf16, f16};

/// Element types the ops accept for K/V and queries; all arithmetic is done in f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}
impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Matches CPU storages that share one float dtype (f32, f16 or bf16) and evaluates
/// `$body` with each bound to its typed `Vec`; any other combination fails naming `$op`.
macro_rules! with_float_storages {
    ($op:expr, ($($s:expr),+) => |$($v:ident),+| $body:expr) => {
        match ($($s),+) {
            ($(candle_core::CpuStorage::F32($v)),+) => $body,
            ($(candle_core::CpuStorage::F16($v)),+) => $body,
            ($(candle_core::CpuStorage::BF16($v)),+) => $body,
            _ => candle_core::bail!("{}: operands must share one float dtype (f32, f16 or bf16)", $op),
        }
    };
}
pub(crate) use with_float_storages;

/// Checks that `t` has rank `dims.len()` and, where `dims[i]` is `Some`, that size.
pub(crate) fn check_shape(
    op: &'static str,
    name: &str,
    t: &Tensor,
    dims: &[Option<usize>],
    expected: &str,
) -> Result<()> {
    let got = t.dims();
    let ok = got.len() == dims.len() && got.iter().zip(dims).all(|(g, d)| d.map(|d| d == *g).unwrap_or(true));
    if !ok {
        return Err(Error::Invalid {
            op,
            msg: format!("{name} must have shape {expected}, got {:?}", got),
        });
    }
    Ok(())
}

/// Fails naming `op` when a size that the op divides by or groups by is 0: `name` is the
/// size (e.g. `"page_size"`), read from `t` (named `t_name`, whose shape the message shows).
pub(crate) fn check_nonzero(op: &'static str, name: &str, value: usize, (t_name, t): (&str, &Tensor)) -> Result<()> {
    if value == 0 {
        return Err(Error::Invalid {
            op,
            msg: format!("{name} must be >= 1, got 0 ({t_name} has shape {:?})", t.dims()),
        });
    }
    Ok(())
}

pub(crate) fn check_dtype(op: &'static str, name: &str, t: &Tensor, allowed: &[DType]) -> Result<()> {
    if !allowed.contains(&t.dtype()) {
        return Err(Error::Invalid {
            op,
            msg: format!(
                "{name} has dtype {:?} (shape {:?}); expected one of {:?}",
                t.dtype(),
                t.dims(),
                allowed
            ),
        });
    }
    Ok(())
}

pub(crate) fn check_same_dtype(op: &'static str, a: (&str, &Tensor), b: (&str, &Tensor)) -> Result<()> {
    if a.1.dtype() != b.1.dtype() {
        return Err(Error::Invalid {
            op,
            msg: format!(
                "{} ({:?}, {:?}) and {} ({:?}, {:?}) must have the same dtype",
                a.0,
                a.1.dims(),
                a.1.dtype(),
                b.0,
                b.1.dims(),
                b.1.dtype()
            ),
        });
    }
    Ok(())
}

pub(crate) fn check_device(op: &'static str, device: &Device, tensors: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in tensors {
        if !t.device().same_device(device) {
            return Err(Error::Invalid {
                op,
                msg: format!(
                    "{name} (shape {:?}) is on {:?} but the op runs on {:?}",
                    t.dims(),
                    t.device().location(),
                    device.location()
                ),
            });
        }
    }
    Ok(())
}

pub(crate) fn check_contiguous(op: &'static str, tensors: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in tensors {
        if !t.is_contiguous() {
            return Err(Error::Invalid {
                op,
                msg: format!("{name} (shape {:?}) must be contiguous", t.dims()),
            });
        }
    }
    Ok(())
}

pub(crate) const FLOAT_DTYPES: &[DType] = &[DType::F32, DType::F16, DType::BF16];

/// Bytes of a page pool `[slots, 2, page_size, head_dim]` of `elem_bytes`-byte elements,
/// or `None` when that overflows `isize` (the most one allocation may hold) or a slot id
/// would not fit the `u32` slot ids of the ops and kernels (`slots >= NONE`).
pub(crate) fn pool_bytes(slots: usize, page_size: usize, head_dim: usize, elem_bytes: usize) -> Option<usize> {
    if slots >= super::NONE as usize {
        return None;
    }
    let bytes = slots
        .checked_mul(2)?
        .checked_mul(page_size)?
        .checked_mul(head_dim)?
        .checked_mul(elem_bytes)?;
    (bytes <= isize::MAX as usize).then_some(bytes)
}

/// The contiguous element range of a layout, or a candle error naming the op.
pub(crate) fn contiguous_range(op: &str, l: &Layout) -> candle_core::Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => candle_core::bail!("{op}: operand must be contiguous, got layout {l:?}"),
    }
}

/// Values of a contiguous f32/f16/bf16 CPU operand as f32.
pub(crate) fn float_values(op: &str, s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<f32>> {
    let (a, b) = contiguous_range(op, l)?;
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        _ => candle_core::bail!("{op}: expected f32, f16 or bf16, got another dtype"),
    })
}

/// f32 values stored as `dt` (f16 and bf16 rounded to nearest even; any other dtype
/// keeps f32).
pub(crate) fn float_storage(v: Vec<f32>, dt: DType) -> CpuStorage {
    match dt {
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

/// The u32 slice of a contiguous u32 CPU storage.
pub(crate) fn u32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let (a, b) = contiguous_range(op, l)?;
    match s {
        CpuStorage::U32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: expected a u32 index tensor, got another dtype"),
    }
}

/// The u32 contents of a contiguous u32 tensor field of an op struct, read on the CPU.
pub(crate) fn u32_field(op: &str, t: &Tensor) -> candle_core::Result<Vec<u32>> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(cpu) => Ok(u32_slice(op, cpu, l)?.to_vec()),
        _ => candle_core::bail!("{op}: index tensor must be on the CPU here"),
    }
}

/// The values of a contiguous float tensor field of an op struct (f32, f16 or bf16),
/// as f32, read on the CPU.
pub(crate) fn float_field(op: &str, name: &str, t: &Tensor) -> candle_core::Result<Vec<f32>> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(cpu) => float_values(op, cpu, l),
        _ => candle_core::bail!("{op}: {name} {:?} must be on the CPU with the op's inputs", t.dims()),
    }
}

/// A borrowed contiguous f32, f16 or bf16 CPU operand, read element by element as f32
/// (large operands are read in place, not copied).
#[derive(Clone, Copy)]
pub(crate) enum FloatSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl FloatSlice<'_> {
    /// Element `i` as f32.
    #[inline(always)]
    pub(crate) fn at(&self, i: usize) -> f32 {
        match self {
            Self::F32(v) => v[i],
            Self::F16(v) => v[i].to_f32(),
            Self::Bf16(v) => v[i].to_f32(),
        }
    }

    /// Elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
            Self::Bf16(v) => v.len(),
        }
    }
}

/// The contiguous range of a float CPU storage as a [`FloatSlice`].
pub(crate) fn float_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<FloatSlice<'a>> {
    let (a, b) = contiguous_range(op, l)?;
    Ok(match s {
        CpuStorage::F32(v) => FloatSlice::F32(&v[a..b]),
        CpuStorage::F16(v) => FloatSlice::F16(&v[a..b]),
        CpuStorage::BF16(v) => FloatSlice::Bf16(&v[a..b]),
        _ => candle_core::bail!("{op}: expected f32, f16 or bf16, got another dtype"),
    })
}

#[cfg(test)]
mod tests {
    use super::pool_bytes;

    #[test]
    fn pool_bytes_is_checked() {
        assert_eq!(pool_bytes(3, 16, 64, 2), Some(3 * 2 * 16 * 64 * 2));
        assert_eq!(pool_bytes(0, 16, 64, 4), Some(0));
        // Wraps to a tiny size with unchecked arithmetic: 2^62 · 2 · 2 = 2^64 ≡ 0.
        assert_eq!(pool_bytes(1, 1 << 62, 2, 1), None);
        assert_eq!(pool_bytes(1 << 20, 1 << 20, 1 << 20, 4), None);
        // Fits usize but not one allocation.
        assert_eq!(pool_bytes(1, 1, 1 << 62, 1), None);
        // Slot ids are u32 (NONE excluded).
        assert_eq!(pool_bytes(u32::MAX as usize, 1, 1, 1), None);
        assert_eq!(
            pool_bytes(u32::MAX as usize - 1, 1, 1, 1),
            Some(2 * (u32::MAX as usize - 1))
        );
    }
}
