//! CUDA graph capture of candle work on a device's stream (cudarc's stream capture),
//! with candle's capture caches on: the safe layer under [`crate::ops::graph`].

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;

/// An instantiated graph (auto-free on launch: memory the capture allocated and did not
/// free keeps its address across launches, and is valid until the next launch).
pub(crate) struct Graph(CudaGraph);

// SAFETY: a graph exec handle is not tied to the thread that made it; cudarc binds the
// context on every launch. `Graph` is owned (never shared: no `Sync`), so it is never
// launched from two threads at once.
unsafe impl Send for Graph {}

impl Graph {
    pub(crate) fn launch(&self) -> Result<()> {
        self.0.launch().w()
    }
}

/// Runs `f` eagerly with candle's graph caches on: the warm-up that fills them with the
/// small host uploads and kernel parameters a capture of the same work will need.
pub(crate) fn warm_up<T>(dev: &CudaDevice, f: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
    let _cache = dev.enable_cuda_graph_htod_cache();
    f()
}

/// Captures the device work `f` enqueues on `dev`'s stream (nothing runs) and
/// instantiates it. On any error the capture is ended and nothing is kept.
pub(crate) fn capture<T>(dev: &CudaDevice, f: impl FnOnce() -> crate::Result<T>) -> crate::Result<(Graph, T)> {
    let _cache = dev.enable_cuda_graph_htod_cache();
    let stream = dev.cuda_stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .w()?;
    let out = f();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    let out = out?;
    let graph = graph
        .w()?
        .ok_or_else(|| candle_core::Error::Msg("the capture recorded no work".into()))?;
    Ok((Graph(graph), out))
}

/// Starts (`on`) or stops the CUDA profiler's collection (`cuProfilerStart` / `Stop`):
/// under `ncu --profile-from-start off`, only the work between the two is profiled.
pub(crate) fn profiler_range(dev: &CudaDevice, on: bool) -> Result<()> {
    let stream = dev.cuda_stream();
    stream.synchronize().w()?;
    stream.context().bind_to_thread().w()?;
    // SAFETY: plain driver calls on the context just bound.
    let r = unsafe {
        if on {
            sys::cuProfilerStart()
        } else {
            sys::cuProfilerStop()
        }
    };
    r.result().w()
}
