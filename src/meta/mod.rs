//! Metadata sized to the working set: the two-level page table (per (sequence, layer,
//! KV head) directories of leaf blocks allocated only for pages that exist), and its
//! mirror on a device with a slot-lookup op.

pub mod device_tables;
pub mod page_table;

pub use crate::ops::page_slots;
pub use device_tables::DeviceTables;
pub use page_table::{flat_table_bytes, DirChange, LeafChange, PageTables, TableChanges, LEAF_PAGES};
