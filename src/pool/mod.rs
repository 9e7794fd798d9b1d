//! The tiered page pool's bookkeeping: slot allocation in each tier and the bucketed LRU
//! that maps a step's selected pages to fast-tier slots. Plain Rust, no candle types.

pub mod bucketed_lru;
pub mod slot_allocator;

pub use bucketed_lru::{BucketedLru, Resolve};
pub use slot_allocator::SlotAllocator;
