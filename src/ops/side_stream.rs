//! [`SideStream`]: device work that overlaps the device's own stream (the tiered step
//! copies its misses on one while the attention over resident pages runs on the other).

use crate::Result;
use candle_core::Device;

/// A second stream of a CUDA device, forked from the device's stream and joined back to
/// it by events. Between [`fork`](Self::fork) and [`join`](Self::join), work enqueued on
/// it (for example `PinnedPagePool::gather_counted_on` (feature `cuda`))
/// runs concurrently with the device's stream; the caller keeps the two sides' buffers
/// apart. Neither call synchronizes with the host, and both may be captured in a
/// [`StepGraph`](crate::ops::StepGraph) (they become edges of the graph).
pub struct SideStream {
    #[cfg(feature = "cuda")]
    pub(crate) inner: super::cuda::side::Side,
}

impl std::fmt::Debug for SideStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SideStream")
    }
}

impl SideStream {
    /// A side stream of `device`, or `None` where work cannot overlap: a CPU device, a
    /// build without the `cuda` feature, or a CUDA device whose buffers track their uses
    /// with events (candle's `Device::new_cuda`; a device from
    /// [`cuda_device`](crate::ops::cuda_device) has that tracking off).
    pub fn new(device: &Device) -> Result<Option<Self>> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Ok(super::cuda::side::Side::new(d)?.map(|inner| Self { inner })),
            _ => Ok(None),
        }
    }

    /// Work enqueued on this stream from now on starts after the work enqueued on the
    /// device's stream so far.
    pub fn fork(&self) -> Result<()> {
        crate::fault::device_call("SideStream::fork")?;
        #[cfg(feature = "cuda")]
        self.inner.fork()?;
        Ok(())
    }

    /// Work enqueued on the device's stream from now on starts after the work enqueued
    /// on this stream so far.
    pub fn join(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        self.inner.join()?;
        Ok(())
    }
}
