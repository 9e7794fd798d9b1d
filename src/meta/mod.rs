//! Metadata sized to the working set: the two-level page table (per (sequence, layer,
//! KV head) directories of leaf blocks allocated only for pages that exist).

pub mod page_table;

pub use page_table::{flat_table_bytes, PageTables, LEAF_PAGES};
