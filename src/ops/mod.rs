//! Candle custom ops over the paged KV substrate.
//!
//! Each op is a private struct implementing candle's `CustomOp*`/`InplaceOp*` traits plus
//! one public function that validates rank, dtype, device and contiguity first and fails
//! with an [`Error::Invalid`](crate::Error::Invalid) naming the op and the shapes. The
//! `cpu_fwd` of every op is the plain reference; `cuda_fwd` (feature `cuda`) launches the
//! kernels in `kernels/`.

use crate::Result;

pub mod append;
pub mod attention;
pub mod count;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod decode_plan;
pub mod graph;
pub mod infllm;
pub(crate) mod lru_resolve;
pub mod merge;
pub mod model_ops;
pub mod page_table;
pub mod prefill;
pub mod quest_q8;
pub mod quest_score;
pub mod reference;
pub mod rope;
pub mod rope_tables;
pub mod sample;
pub mod self_attention;
pub mod shadowkv;
pub mod side_stream;
pub mod tier_copy;
pub mod tiered_attention;
pub mod topk;
pub mod upload;
pub(crate) mod util;

pub use append::{paged_append, paged_append_with_minmax, quest_meta_update};
pub use attention::{sparse_paged_attention, AttentionPartial, PageList};
pub use count::count_listed_into;
pub use decode_plan::{expand_decode_plan, PlanWords};
pub use graph::{cuda_device, profiler_range, StepGraph};
pub use infllm::{
    infllm_block_scores, infllm_finalize, infllm_mass_add, infllm_pages, infllm_restore, infllm_ring_write,
    infllm_window_mass, InfLlmGeometry,
};
pub use merge::merge_partials;
pub use model_ops::{add_rms_norm, logits_f32, rms_norm, silu_mul};
pub use page_table::{page_slots, page_slots_grid, page_slots_grid_limited, GridLimit};
pub use prefill::{prefill_attention, prefill_attention_supported, PrefillChunk, PrefillTiles};
pub use quest_q8::{dequantize_quest_q8, quest_q8_bounds, quest_q8_row_bytes};
pub use quest_score::quest_page_scores;
pub use reference::reference_attention;
pub use rope::rope_qkv;
pub use rope_tables::{rope_cos_sin, rope_inv_freq, rope_tables_into};
pub use sample::{sample_params, sample_rows, sample_rows_into, SampleRow, SAMPLE_PARAM_WORDS};
pub use self_attention::causal_self_attention;
pub use shadowkv::{shadowkv_lists, shadowkv_rebuild, shadowkv_scores, ShadowKvGeometry};
pub use side_stream::SideStream;
pub use tier_copy::copy_pages;
pub use tiered_attention::{tiered_attention_fused, tiered_paged_attention};
pub use topk::topk_indices;
pub use upload::{Mailbox, StagedUpload};

/// Tuning and test knobs of the CUDA backend (feature `cuda`), and the device-only
/// helper that turns a top-k selection into page pairs.
#[cfg(feature = "cuda")]
pub use cuda::{
    selection_to_pages, set_attention_g8, set_attention_waves, set_poison_outputs, set_prefill_pingpong,
    set_prefill_wgmma, set_side_copy_blocks, PrefillPingPong,
};

/// Loads every spinkv kernel on `device` (a CUDA device; on others nothing is done),
/// so that the driver's one-time JIT compilation of the kernels' PTX (seconds) happens
/// here rather than in the first step that uses each kernel. Returns the number of
/// kernels loaded. [`Engine::new`](crate::engine::Engine::new) calls it. With the
/// environment variable `SPINKV_PRELOAD_KERNELS=0` it does nothing (kernels then load
/// on first use), for diagnosing tools that track module loads.
pub fn preload_kernels(device: &candle_core::Device) -> Result<usize> {
    if std::env::var("SPINKV_PRELOAD_KERNELS").is_ok_and(|v| v == "0") {
        return Ok(0);
    }
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => Ok(cuda::preload(d)?),
        _ => Ok(0),
    }
}

#[path = "kernel_consts.rs"]
mod kernel_consts;
pub use kernel_consts::{
    EMPTY_LSE, LEAF_PAGES, NONE, PREFILL_ROWS, QUEST_Q8_EXP_MAX, QUEST_Q8_EXP_MIN, QUEST_Q8_TAIL_BYTES,
};
