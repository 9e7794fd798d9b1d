//! # spinkv
//!
//! Dynamic sparse attention over a paged KV cache kept in two tiers — a fast tier (GPU
//! HBM) and a capacity tier (pinned host memory) — built on candle, following the SPIN
//! design (arXiv 2604.26837): one page substrate under several sparse-attention
//! algorithms, a locality-aware tiered cache, and metadata sized to the working set.
//!
//! Model code talks to a [`SparseKvCache`] once per layer per step:
//!
//! ```
//! use spinkv::{CacheConfig, SpinCache, SparseKvCache, StepInput};
//! use spinkv::partition::{Quest, QuestConfig};
//! use candle_core::{Device, Tensor};
//!
//! # fn main() -> spinkv::Result<()> {
//! let cfg = CacheConfig::new(2, 4, 2, 64); // layers, Hq, Hkv, D (CPU, f32)
//! let mut cache = SpinCache::new(cfg, Quest::new(QuestConfig { budget_tokens: 256, ..Default::default() }))?;
//! let seq = cache.add_sequence()?;
//! cache.begin_step(&[StepInput { seq, new_tokens: 5 }])?;
//! for layer in 0..2 {
//!     let q = Tensor::randn(0f32, 1., (5, 4, 64), &Device::Cpu)?;
//!     let k = Tensor::randn(0f32, 1., (5, 2, 64), &Device::Cpu)?;
//!     let v = Tensor::randn(0f32, 1., (5, 2, 64), &Device::Cpu)?;
//!     let out = cache.attend(layer, &q, &k, &v)?; // [5, 4, 64]
//!     assert_eq!(out.dims(), &[5, 4, 64]);
//! }
//! cache.end_step()?;
//! cache.remove_sequence(seq)?; // frees its pages in both tiers
//! # Ok(()) }
//! ```

pub mod cache;
pub mod config;
#[cfg(feature = "models")]
pub mod engine;
pub mod error;
pub mod fault;
pub mod host_timing;
pub mod linalg;
pub mod meta;
#[cfg(feature = "models")]
pub mod models;
pub mod ops;
pub mod partition;
pub mod pool;
pub mod rope;
#[cfg(feature = "server")]
pub mod server;
pub mod sim;
pub mod tiered;
pub mod trace;

pub use cache::{
    FanOut, PaddedShape, PoolUsage, SelectionRecord, SeqId, SparseKvCache, SpinCache, StepInput, StepStats,
};
pub use config::{CacheConfig, FetchMode};
pub use error::{Error, Result, Tier};
pub use pool::PageLayout;
