//! The tiered GPU cache's device-side pieces: the host tier as the cache sees it (a
//! tensor pool on the CPU, mapped pinned memory with a GPU), and the bucketed LRU whose
//! state and resolve step live on the cache's device.

pub mod device_lru;
pub(crate) mod host_tier;

pub use device_lru::{DeviceLru, ResolveOutput, ResolveRequest};
pub(crate) use host_tier::HostTier;
