//! Build script: compiles the CUDA kernels in `kernels/` to PTX with nvcc, only when the
//! `cuda` feature is on. Without it the script does nothing, so the default build needs
//! no CUDA toolkit.
//!
//! Each kernel file becomes `$OUT_DIR/<name>.ptx`, embedded by `src/cuda/mod.rs` with
//! `include_str!` and loaded at run time through candle's
//! `CudaDevice::get_or_load_custom_func`. The target is `sm_$CUDA_COMPUTE_CAP` (default
//! 90: H100/H200); nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the PATH.

use std::path::PathBuf;
use std::process::Command;

/// Kernel sources, listed explicitly (one PTX module each).
const KERNELS: &[&str] = &[
    "append",
    "quest_score",
    "topk",
    "attention",
    "tier_copy",
    "page_table",
    "lru_resolve",
];
/// Headers every kernel includes.
const HEADERS: &[&str] = &["kernels/common.cuh"];

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return Ok(());
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    for h in HEADERS {
        println!("cargo:rerun-if-changed={h}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap = cap.trim().replace('.', "");
    if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_digit()) {
        anyhow::bail!("CUDA_COMPUTE_CAP must be a number such as 90 or 8.0, got {cap:?}");
    }
    let nvcc = match std::env::var_os("NVCC") {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("CUDA_HOME").or_else(|| std::env::var_os("CUDA_PATH")) {
            Some(home) if PathBuf::from(&home).join("bin/nvcc").exists() => PathBuf::from(home).join("bin/nvcc"),
            _ => PathBuf::from("nvcc"),
        },
    };
    for name in KERNELS {
        let src = format!("kernels/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let ptx = out_dir.join(format!("{name}.ptx"));
        let output = Command::new(&nvcc)
            .args([
                "--ptx",
                &format!("-arch=sm_{cap}"),
                "-O3",
                "-std=c++17",
                "-lineinfo",
                "-Ikernels",
                "-o",
            ])
            .arg(&ptx)
            .arg(&src)
            .output()
            .map_err(|e| {
                anyhow::anyhow!(
                    "failed to run {} (set NVCC or CUDA_HOME, or see scripts/install-cuda-toolkit.sh): {e}",
                    nvcc.display()
                )
            })?;
        if !output.status.success() {
            anyhow::bail!(
                "nvcc failed on {src}:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(())
}
