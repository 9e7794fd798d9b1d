//! Linear algebra candle lacks: a randomized truncated SVD (range finder + small dense
//! eigen solve) for ShadowKV's low-rank keys. Large products run as candle ops on the
//! tensor's device (in f64); the small `k × k` factorizations run in plain Rust.

mod randomized_svd;
mod small;

pub use randomized_svd::{
    randomized_low_rank, randomized_low_rank_batch, randomized_low_rank_stacked, LowRank, LowRankOptions,
};
pub use small::{cholesky_upper, symmetric_eigen, upper_inverse};
