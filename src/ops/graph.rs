//! [`StepGraph`]: device work captured once into a CUDA graph and replayed, for steps
//! whose device work depends only on their shape (every changing input written in place
//! into buffers allocated before the capture; see
//! [`SparseKvCache::begin_padded_decode`](crate::SparseKvCache::begin_padded_decode)).
//! Available with the `cuda` feature on CUDA devices; elsewhere every call is an error
//! naming the device.
//!
//! The protocol, as `spinkv::engine` runs it: [`warm_up`](StepGraph::warm_up) runs a
//! step of the shape eagerly once with candle's capture caches on, then
//! [`capture`](StepGraph::capture) records the next step of that shape (the work runs
//! only at [`launch`](StepGraph::launch)), and later steps of the shape launch the
//! graph. Tensors the capture returned keep their device addresses across launches and
//! hold each launch's results until the next launch.

use crate::{Error, Result};
use candle_core::Device;

/// A captured, instantiated CUDA graph.
pub struct StepGraph {
    #[cfg(feature = "cuda")]
    graph: super::cuda::graph::Graph,
}

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepGraph")
    }
}

#[cfg(feature = "cuda")]
fn cuda<'a>(op: &'static str, device: &'a Device) -> Result<&'a candle_core::CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        d => Err(Error::Invalid {
            op,
            msg: format!("CUDA graphs need a CUDA device, got {:?}", d.location()),
        }),
    }
}

impl StepGraph {
    /// Whether graphs can be captured on `device` (a CUDA device with the `cuda` feature).
    pub fn supported(device: &Device) -> bool {
        cfg!(feature = "cuda") && device.is_cuda()
    }

    /// Runs `f` eagerly with candle's capture caches on (fills them with the small host
    /// uploads and kernel parameters that a capture of the same work needs).
    pub fn warm_up<T>(device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
        #[cfg(feature = "cuda")]
        {
            super::cuda::graph::warm_up(cuda("StepGraph::warm_up", device)?, f)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = f;
            Err(unsupported("StepGraph::warm_up", device))
        }
    }

    /// Captures the device work `f` enqueues (none of it runs now) and instantiates it;
    /// returns the graph and what `f` returned. Fails when `f` fails or the work cannot
    /// be captured (a host synchronization, an upload missing from the warm-up).
    pub fn capture<T>(device: &Device, f: impl FnOnce() -> Result<T>) -> Result<(Self, T)> {
        #[cfg(feature = "cuda")]
        {
            let (graph, out) = super::cuda::graph::capture(cuda("StepGraph::capture", device)?, f)?;
            Ok((Self { graph }, out))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = f;
            Err(unsupported("StepGraph::capture", device))
        }
    }

    /// Enqueues one replay on the capture's stream (asynchronous).
    pub fn launch(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            Ok(self.graph.launch()?)
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(unsupported("StepGraph::launch", &Device::Cpu))
        }
    }
}

/// Starts (`on`) or stops the CUDA profiler's collection on `device`, after waiting for
/// its work: run under `ncu --profile-from-start off`, only the kernels enqueued between
/// the two calls are profiled (`serve_bench --profile-steps`). Elsewhere a no-op.
pub fn profiler_range(device: &Device, on: bool) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        super::cuda::graph::profiler_range(d, on)?;
    }
    let _ = (device, on);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn unsupported(op: &'static str, device: &Device) -> Error {
    Error::Invalid {
        op,
        msg: format!(
            "CUDA graphs need the `cuda` feature and a CUDA device, got {:?}",
            device.location()
        ),
    }
}

/// CUDA device `ordinal` on a stream of its own (non-blocking, not the legacy or
/// per-thread default stream), the kind of device graphs are captured on. Its event
/// tracking is off: spinkv enqueues all work on that one stream, whose order is the
/// only synchronization it needs, and tracking events recorded before a capture would
/// break the capture. Without the `cuda` feature, an error.
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        let dev = Device::new_cuda_with_stream(ordinal)?;
        if let Device::Cuda(d) = &dev {
            // SAFETY: nothing was allocated on this device yet, and everything spinkv
            // and candle enqueue on it goes to its one stream (in order).
            unsafe { d.disable_event_tracking() };
        }
        Ok(dev)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(Error::Invalid {
            op: "ops::graph::cuda_device",
            msg: format!("CUDA device {ordinal}: this build has no `cuda` feature"),
        })
    }
}
