// Constants shared by the Rust ops and the CUDA kernels: the one source of both.
// `build.rs` includes this file and writes `$OUT_DIR/spinkv_consts.cuh` from it, which
// `kernels/common.cuh` includes; the crate re-exports the constants from `ops` and
// `meta`. Plain `pub const` items only (the file is also compiled inside build.rs).

/// Sentinel for "no entry" in every u32 index tensor (padding, unselected, not resident).
pub const NONE: u32 = u32::MAX;

/// log-sum-exp value of an empty attention row. Finite, so merging two empty partials
/// gives zeros instead of NaN.
pub const EMPTY_LSE: f32 = -1.0e30;

/// Logical pages per leaf block of the two-level page tables.
pub const LEAF_PAGES: usize = 64;

/// Query rows of one prefill-attention tile: the (token, head-in-group) pairs of up to
/// `PREFILL_ROWS / g` tokens of one chunk, `g` query heads per KV head.
pub const PREFILL_ROWS: usize = 128;

/// u32 words describing one prefill-attention tile (see `ops::PrefillTiles`).
pub const PREFILL_TILE_WORDS: usize = 6;

/// Warps per block of `lru_resolve` (one warp per bucket with requests; the kernel
/// sizes a shared array by it). Used by the CUDA glue only.
#[allow(dead_code)]
pub const LRU_RESOLVE_WARPS: usize = 4;

/// Bytes after the `2·D` int8 bounds of a row of Quest's int8 page bounds
/// (`ops::quest_q8`): the page's f32 scale, then zeros, so rows stay 16-byte aligned.
pub const QUEST_Q8_TAIL_BYTES: usize = 16;

/// Range of the power-of-two exponent `e` of an int8 bounds row's scale `2^e` (keeps
/// `2^e` and `2^-e` normal f32 values).
pub const QUEST_Q8_EXP_MIN: i32 = -126;
/// See [`QUEST_Q8_EXP_MIN`].
pub const QUEST_Q8_EXP_MAX: i32 = 120;

/// Query heads per KV head InfLLM's CUDA window mass holds in registers (it refuses more).
/// Used by the CUDA glue only.
#[allow(dead_code)]
pub const INFLLM_MAX_GROUP: usize = 16;

/// Most query heads per KV head that ShadowKV's score kernel takes (its per-head
/// registers; `SPIN_SHADOWKV_MAX_GROUP`).
pub const SHADOWKV_MAX_GROUP: usize = 16;
