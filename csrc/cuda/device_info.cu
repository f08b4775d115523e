// Placeholder CUDA translation unit: proves the CUDA toolchain switch of setup.py compiles and
// links device code.  The CUDA implementations of the ops live beside it (see issue "CUDA kernels").
#include <cuda_runtime.h>

namespace apb_sparse {
namespace cuda {

__global__ void probe_kernel(int* out) { *out = 1; }

/// Number of visible CUDA devices (0 when no driver or device is present).
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

}  // namespace cuda
}  // namespace apb_sparse
