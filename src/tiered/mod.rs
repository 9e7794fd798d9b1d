//! The tiered GPU cache's device-side pieces: state that the fast-tier cache keeps in
//! device tensors so that a decode step can run without host synchronization.
//! [`DeviceLru`] is the bucketed LRU with per-owner budgets
//! ([`BucketedLru`](crate::pool::BucketedLru)'s policy) resolved on the device;
//! `HostTier` is the capacity tier as the cache sees it (a tensor pool on the CPU, mapped
//! pinned memory with a GPU).

pub mod device_lru;
pub(crate) mod host_tier;
#[cfg(feature = "cuda")]
pub mod pinned;

pub use device_lru::{DeviceLru, FastHomes, ResolveOutput, ResolveRequest};
pub(crate) use host_tier::HostTier;
#[cfg(feature = "cuda")]
pub use pinned::PinnedPagePool;
