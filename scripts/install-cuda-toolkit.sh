#!/usr/bin/env bash
# spinkv: installs a CUDA 13.0 build toolchain without a system CUDA install, so that
# `cargo build --features cuda` works on a machine with no GPU (CI, build boxes).
#
# What it installs into PREFIX (default $SPINKV_CUDA_PREFIX, else
# $HOME/.cache/spinkv/cuda13: user-writable, no root needed; ~1.3 GB): nvcc, ptxas and headers,
# cudart, cuBLAS/cuBLASLt, cuRAND and NVRTC from NVIDIA's official wheels on PyPI, plus a
# link-time stub of libcuda.so (the real libcuda.so.1 comes with the driver of the
# machine that runs the binary). It also writes PREFIX/env.sh, which sets CUDA_HOME,
# PATH, LIBRARY_PATH and CUDA_COMPUTE_CAP (default 90) for a build.
#
# Needs: bash, python3 with pip, gcc, and network access to PyPI (and to crates.io if
# cudarc's sources are not in ~/.cargo yet: `cargo fetch` in the repository first makes
# the stub match the locked cudarc). Idempotent: exits early when installed.
#
# Why 13.0: a driver only accepts PTX from an nvcc no newer than itself; the H200
# machines run driver 580 (CUDA 13.0), and the library sonames (libcublas.so.13,
# libcurand.so.10, libcudart.so.13) must match those on the machine that runs the
# binary. On a machine with a normal CUDA toolkit, skip this script and set CUDA_HOME.
#
# Usage:  scripts/install-cuda-toolkit.sh [PREFIX]
#         source PREFIX/env.sh
set -euo pipefail
PREFIX=${1:-${SPINKV_CUDA_PREFIX:-$HOME/.cache/spinkv/cuda13}}
write_env() {
  cat > "$PREFIX/env.sh" <<ENV
# Source before \`cargo build --features cuda\` (written by scripts/install-cuda-toolkit.sh).
export CUDA_HOME=$PREFIX CUDA_PATH=$PREFIX
export PATH=$PREFIX/bin:\$PATH
export LIBRARY_PATH=$PREFIX/lib/stubs:$PREFIX/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
ENV
}
if [ -x "$PREFIX/bin/nvcc" ] && [ -e "$PREFIX/lib/stubs/libcuda.so" ]; then
  [ -e "$PREFIX/env.sh" ] || write_env
  echo "CUDA toolchain already in $PREFIX (source $PREFIX/env.sh)"
  exit 0
fi
for tool in python3 gcc; do
  command -v "$tool" >/dev/null || { echo "install-cuda-toolkit: $tool is required" >&2; exit 1; }
done
python3 -m pip --version >/dev/null 2>&1 || { echo "install-cuda-toolkit: python3 -m pip is required" >&2; exit 1; }
mkdir -p "$PREFIX" 2>/dev/null || { echo "install-cuda-toolkit: cannot create $PREFIX (try sudo or another PREFIX)" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --no-deps -d "$TMP/whl" \
  "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" \
  "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-nvrtc==13.0.88" \
  "nvidia-curand==10.4.5.25" "nvidia-cublas==13.0.2.14"
mkdir -p "$TMP/x"
for w in "$TMP"/whl/*.whl; do python3 -m zipfile -e "$w" "$TMP/x"; done
cp -a "$TMP"/x/nvidia/cu13/. "$PREFIX"/
chmod +x "$PREFIX"/bin/* "$PREFIX"/nvvm/bin/* 2>/dev/null || true
cd "$PREFIX/lib"
for l in cudart cublas cublasLt curand nvrtc; do
  f=$(ls lib$l.so.* | grep -v alt | head -1); ln -sf "$f" "lib$l.so"
done
# Link-time stub for the driver library: every cu* entry point that cudarc declares.
mkdir -p stubs
SYMS=$(grep -ohE '"cu[A-Za-z0-9_]+"' "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null | tr -d '"' | sort -u || true)
if [ -z "$SYMS" ]; then
  # cudarc's sources are not fetched yet: fetch them so the symbol list can be read.
  (cd "$TMP" && cargo new -q --lib probe && cd probe && cargo add -q cudarc@0.19 --no-default-features && cargo fetch -q)
  SYMS=$(grep -ohE '"cu[A-Za-z0-9_]+"' "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs | tr -d '"' | sort -u)
fi
for s in $SYMS; do echo "void $s(void){}"; done > "$TMP/stub.c"
gcc -shared -fPIC -o stubs/libcuda.so -Wl,-soname,libcuda.so.1 "$TMP/stub.c"
write_env
"$PREFIX/bin/nvcc" --version | tail -1
echo "installed in $PREFIX; now: source $PREFIX/env.sh"
