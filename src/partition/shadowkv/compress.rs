//! ShadowKV's compression of a prefill: the batched low-rank factorization of the
//! pre-RoPE keys, the landmarks (mean post-RoPE key per chunk) and the outlier chunks
//! (lowest minimum cosine similarity of a key to its landmark), and the RoPE tables both
//! use.

use super::{Compressed, ShadowKv};
use crate::linalg::{randomized_low_rank_batch, LowRank, LowRankOptions};
use crate::rope::{apply_rope, rope_tables};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

impl ShadowKv {
    /// Compresses, for each `(keys, chunks)`, the first `chunks` chunks of the buffered
    /// pre-RoPE keys `[L, Hkv, D]` (no keys or no chunks: nothing compressed); the
    /// factorizations run as one batch.
    pub(super) fn compress_batch(
        &self,
        items: &[(Option<&Tensor>, usize)],
        rope: Option<&(Tensor, Tensor)>,
    ) -> Result<Vec<Compressed>> {
        let (p, hkv, d) = (self.page_size, self.kv_heads, self.head_dim);
        let mut k_pre = Vec::with_capacity(items.len());
        for &(k, chunks) in items {
            k_pre.push(match k {
                // [L, Hkv, D]
                Some(k) if chunks > 0 => Some(k.narrow(0, 0, chunks * p)?.to_dtype(DType::F32)?.contiguous()?),
                _ => None,
            });
        }
        let flat: Vec<Tensor> = k_pre
            .iter()
            .flatten()
            .map(|k| k.reshape((k.dim(0)?, hkv * d)))
            .collect::<candle_core::Result<_>>()?;
        let refs: Vec<&Tensor> = flat.iter().collect();
        let mut factors = randomized_low_rank_batch(&refs, self.cfg.rank, LowRankOptions::default())?.into_iter();
        let mut out = Vec::with_capacity(items.len());
        for (k, &(_, chunks)) in k_pre.iter().zip(items) {
            out.push(match k {
                Some(k) => {
                    let lr = factors
                        .next()
                        .ok_or_else(|| Error::Config("shadowkv: a factor is missing".into()))?;
                    let rope = rope.ok_or_else(|| Error::Config("shadowkv: no RoPE tables to compress with".into()))?;
                    self.compress(k, chunks, lr, rope)?
                }
                None => Compressed {
                    chunks: 0,
                    left: None,
                    right: None,
                    landmarks: None,
                    outlier: vec![Vec::new(); hkv],
                    outlier_ids: vec![Vec::new(); hkv],
                    outlier_mask: None,
                    left_pages: Vec::new(),
                },
            });
        }
        Ok(out)
    }

    /// The compressed state of `chunks` chunks of pre-RoPE keys `k_pre` `[L, Hkv, D]`
    /// with their low-rank factor `lr`: landmarks and outlier flags.
    fn compress(&self, k_pre: &Tensor, chunks: usize, lr: LowRank, rope: &(Tensor, Tensor)) -> Result<Compressed> {
        let (p, hkv, d) = (self.page_size, self.kv_heads, self.head_dim);
        let l = chunks * p;
        let (cos, sin) = (rope.0.narrow(0, 0, l)?, rope.1.narrow(0, 0, l)?);
        let k_post = apply_rope(k_pre, &cos, &sin)?.reshape((chunks, p, hkv, d))?;
        let landmarks = k_post.mean(1)?; // [C, Hkv, D]
        let unit = |x: &Tensor| -> Result<Tensor> {
            let norm = x.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?;
            Ok(x.broadcast_div(&(norm + 1e-12)?)?)
        };
        let cos_sim = unit(&k_post)?
            .broadcast_mul(&unit(&landmarks)?.unsqueeze(1)?)?
            .sum(3)? // [C, P, Hkv]
            .min(1)? // [C, Hkv]
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        let outlier: Vec<Vec<bool>> = (0..hkv)
            .map(|h| {
                let mut order: Vec<usize> = (0..chunks).collect();
                order.sort_by(|&a, &b| cos_sim[a][h].total_cmp(&cos_sim[b][h]).then(a.cmp(&b)));
                let mut flags = vec![false; chunks];
                for &c in order.iter().take(self.cfg.outlier_chunks) {
                    flags[c] = true;
                }
                flags
            })
            .collect();
        let outlier_ids = outlier
            .iter()
            .map(|f| (0..chunks as u32).filter(|&c| f[c as usize]).collect())
            .collect();
        let mask: Vec<f32> = outlier
            .iter()
            .flat_map(|f| f.iter().map(|&o| if o { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Ok(Compressed {
            chunks,
            left: Some(lr.left),
            right: Some(lr.right),
            landmarks: Some(landmarks.transpose(0, 1)?.contiguous()?),
            outlier,
            outlier_ids,
            outlier_mask: Some(Tensor::from_vec(mask, (hkv, chunks), k_pre.device())?),
            left_pages: Vec::new(),
        })
    }
}

/// The RoPE tables `cos`, `sin` `[n, D/2]` f32 on `device` for positions `0..n`,
/// `n >= upto`, kept in `tables` (built once per device, grown by doubling).
pub(super) fn rope_tables_upto(
    tables: &mut Option<(Tensor, Tensor)>,
    upto: usize,
    head_dim: usize,
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let usable = |c: &Tensor| c.device().same_device(device);
    let have = match tables.as_ref() {
        Some((c, _)) if usable(c) => c.dim(0)?,
        _ => 0,
    };
    if let (Some(t), true) = (tables.as_ref(), have > 0 && have >= upto) {
        return Ok(t.clone());
    }
    let n = upto.max(2 * have).max(1024);
    let positions: Vec<u32> = (0..n as u32).collect();
    let t = rope_tables(&positions, head_dim, theta, DType::F32, device)?;
    *tables = Some(t.clone());
    Ok(t)
}
