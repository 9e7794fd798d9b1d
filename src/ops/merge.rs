//! Exact combination of partial attention states (flash-decoding's merge).

use super::attention::AttentionPartial;
use crate::Result;

/// Merges two partial states over disjoint key sets into the state over their union:
/// `lse = log(exp(lse_a) + exp(lse_b))`, `out = (out_a·exp(lse_a) + out_b·exp(lse_b)) / exp(lse)`.
///
/// Shapes: `out` `[T, Hq, D]` f32, `lse` `[T, Hq]` f32, equal in `a` and `b`.
pub fn merge_partials(a: &AttentionPartial, b: &AttentionPartial) -> Result<AttentionPartial> {
    if a.out.dims() != b.out.dims() || a.lse.dims() != b.lse.dims() {
        crate::invalid!(
            "merge_partials",
            "partials differ in shape: out {:?} vs {:?}, lse {:?} vs {:?}",
            a.out.dims(),
            b.out.dims(),
            a.lse.dims(),
            b.lse.dims()
        );
    }
    let m = a.lse.maximum(&b.lse)?;
    let wa = (&a.lse - &m)?.exp()?;
    let wb = (&b.lse - &m)?.exp()?;
    let sum = (&wa + &wb)?;
    let lse = (&m + sum.log()?)?;
    let wa = (wa / &sum)?.unsqueeze(2)?;
    let wb = (wb / &sum)?.unsqueeze(2)?;
    let out = (a.out.broadcast_mul(&wa)? + b.out.broadcast_mul(&wb)?)?;
    Ok(AttentionPartial { out, lse })
}
