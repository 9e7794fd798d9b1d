# spinkv: loader setup on a GPU machine that has the driver and PyTorch's CUDA 13 libraries
# but no CUDA toolkit install (copy of shared/cuda/device-env.sh; used by scripts/gpu-package.sh).
# Source this ON THE GPU MACHINE before running a binary built with `--features cuda`.
# It points the loader at the driver's libcuda and at the CUDA 13 libraries that the
# GPU machine's PyTorch ships (cuBLAS, cuRAND, cudart, NVRTC).
_SP=$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:$(ls -d "$_SP"/nvidia/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
unset _SP
