//! The tiered page pool's bookkeeping: slot allocation in each tier (page groups in a
//! [`PageLayout`]), the bucketed LRU
//! that maps a step's selected pages to fast-tier slots, and per-request fast-tier
//! budgets. Plain Rust, no candle types.

pub mod bucketed_lru;
pub mod budget;
pub mod page_slots;
pub mod slot_allocator;

pub use bucketed_lru::{BucketedLru, Resolve, NO_OWNER};
pub use budget::{water_fill, BudgetPolicy, BudgetTracker};
pub use page_slots::{PageLayout, PageSlots};
pub use slot_allocator::SlotAllocator;
