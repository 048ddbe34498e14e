/* device_kv_budget on the CUDA backend: cudaMemGetInfo on the backend's device. */
#include <string.h>

#include "backend/cuda/cuda_common.cuh"

extern "C" {
#include "dist/device_mem.h"
}

extern "C" int device_kv_budget(backend *be, double utilization, int64_t *kv_bytes, ts_err *err) {
  *kv_bytes = 0;
  if (!(utilization > 0.0 && utilization <= 1.0))
    return ts_errorf(err, TS_EINVAL, "--gpu-memory-utilization %g must be in (0, 1]", utilization);
  if (!be || !be->ops || strcmp(be->ops->name, "cuda") != 0) return 0;
  cuda_ctx *c = (cuda_ctx *)be->ctx;
  size_t free_b = 0, total_b = 0;
  cudaError_t e = cudaSetDevice(c->device);
  if (e == cudaSuccess) e = cudaMemGetInfo(&free_b, &total_b);
  if (e != cudaSuccess)
    return ts_errorf(err, TS_EINTERNAL, "CUDA error %s in cudaMemGetInfo (device %d)",
                     cudaGetErrorName(e), c->device);
  double used = (double)(total_b - free_b), allowed = utilization * (double)total_b;
  if (allowed - used < 1.0)
    return ts_errorf(err, TS_ENOMEM,
                     "--gpu-memory-utilization %.3g allows %.2f GiB of device %d's %.2f GiB, but "
                     "%.2f GiB are already in use (weights, activations, other processes); "
                     "nothing is left for the KV cache: raise it or use a smaller model",
                     utilization, allowed / (1 << 30), c->device, (double)total_b / (1 << 30),
                     used / (1 << 30));
  *kv_bytes = (int64_t)(allowed - used);
  return 0;
}
