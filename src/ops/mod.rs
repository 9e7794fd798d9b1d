//! Candle custom ops over the paged KV substrate.
//!
//! Each op is a private struct implementing candle's `CustomOp*`/`InplaceOp*` traits plus
//! one public function that validates rank, dtype, device and contiguity first and fails
//! with an [`Error::Invalid`](crate::Error::Invalid) naming the op and the shapes. The
//! `cpu_fwd` of every op is the plain reference; `cuda_fwd` (feature `cuda`) launches the
//! kernels in `kernels/`.

pub mod append;
pub mod attention;
pub(crate) mod lru_resolve;
pub mod merge;
pub mod quest_score;
pub mod reference;
pub mod self_attention;
pub mod tier_copy;
pub mod topk;
pub(crate) mod util;

pub use append::{paged_append, paged_append_with_minmax, quest_meta_update};
pub use attention::{sparse_paged_attention, AttentionPartial, PageList};
pub use merge::merge_partials;
pub use quest_score::quest_page_scores;
pub use reference::reference_attention;
pub use self_attention::causal_self_attention;
pub use tier_copy::copy_pages;
pub use topk::topk_indices;

/// Sentinel for "no entry" in every u32 index tensor (padding, unselected, not resident).
pub const NONE: u32 = u32::MAX;

/// log-sum-exp value of an empty attention row. Finite, so merging two empty partials
/// gives zeros instead of NaN.
pub const EMPTY_LSE: f32 = -1.0e30;
