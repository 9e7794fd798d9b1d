//! The tiered GPU cache's device-side pieces: state that the fast-tier cache keeps in
//! device tensors so that a decode step can run without host synchronization.
//! [`DeviceLru`] is the bucketed LRU with per-owner budgets
//! ([`BucketedLru`](crate::pool::BucketedLru)'s policy) resolved on the device.

pub mod device_lru;

pub use device_lru::{DeviceLru, ResolveOutput, ResolveRequest};
