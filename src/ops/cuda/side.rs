//! A second CUDA stream beside a candle device's own, forked from it and joined back to it
//! by events: the glue under [`crate::ops::SideStream`]. Recording and waiting on events
//! are stream operations, so a fork and a join inside a capture become edges of the
//! captured graph, and neither synchronizes with the host.

use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaStream};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;
use std::sync::Arc;

/// A non-blocking stream of `dev`'s context and the two events that order it against
/// `dev`'s stream.
pub(crate) struct Side {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    forked: CudaEvent,
    done: CudaEvent,
}

// SAFETY: cudarc's stream and event handles are not tied to the thread that made them
// (cudarc binds the context on every call); `Side` is owned by one cache and used from
// one thread at a time (`&self` methods only enqueue stream operations).
unsafe impl Send for Side {}

impl Side {
    /// A side stream of `dev`, or `None` when `dev`'s context tracks buffer uses with
    /// events (candle's `Device::new_cuda`): a second stream would switch that tracking on
    /// for every launch (an event per argument), and events recorded before a capture
    /// break it. Devices made by [`crate::ops::cuda_device`] have tracking off.
    pub(crate) fn new(dev: &CudaDevice) -> Result<Option<Self>> {
        if dev.is_event_tracking() {
            return Ok(None);
        }
        let ctx = dev.cuda_stream().context().clone();
        // Timing off: the cheapest events, for ordering only.
        let flags = Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        Ok(Some(Self {
            dev: dev.clone(),
            stream: ctx.new_stream().w()?,
            forked: ctx.new_event(flags).w()?,
            done: ctx.new_event(flags).w()?,
        }))
    }

    /// The side stream.
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device whose stream this one forks from.
    pub(crate) fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// Work enqueued on the side stream from now on starts after the work enqueued on the
    /// device's stream so far.
    pub(crate) fn fork(&self) -> Result<()> {
        self.forked.record(&self.dev.cuda_stream()).w()?;
        self.stream.wait(&self.forked).w()
    }

    /// Work enqueued on the device's stream from now on starts after the work enqueued on
    /// the side stream so far.
    pub(crate) fn join(&self) -> Result<()> {
        self.done.record(&self.stream).w()?;
        self.dev.cuda_stream().wait(&self.done).w()
    }
}
