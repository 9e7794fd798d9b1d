//! The device an example runs on, from its `--cuda` flag (shared with `#[path]` includes).

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// CUDA device 0 with `cuda`, else the CPU; a clear error when the binary was built
/// without the `cuda` feature or no GPU is usable.
pub fn device(cuda: bool) -> Result<Device> {
    if !cuda {
        Ok(Device::Cpu)
    } else if cfg!(feature = "cuda") {
        spinkv::ops::cuda_device(0).context("--cuda: no usable CUDA device 0")
    } else {
        bail!("--cuda needs a build with `--features cuda` (this binary was built without it)")
    }
}
