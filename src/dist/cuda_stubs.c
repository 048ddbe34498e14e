/* Stand-ins for the CUDA-only parts of dist/ (comm_nccl.cu, device_mem.cu) in builds without
 * the CUDA backend or without NCCL, so callers need no conditional code. */
#include "dist/comm_nccl.h"
#include "dist/device_mem.h"

#ifndef TESSERA_HAVE_NCCL
int comm_nccl_available(void) { return 0; }

int comm_nccl_create(const comm_nccl_config *cfg, comm **out, ts_err *err) {
  (void)cfg;
  *out = NULL;
  return ts_errorf(err, TS_EUNSUPPORTED,
                   "this tessera was built without NCCL (needs the CUDA backend and libnccl)");
}
#endif

#ifndef TESSERA_HAVE_CUDA
int device_kv_budget(backend *be, double utilization, int64_t *kv_bytes, ts_err *err) {
  (void)be;
  *kv_bytes = 0;
  if (!(utilization > 0.0 && utilization <= 1.0))
    return ts_errorf(err, TS_EINVAL, "--gpu-memory-utilization %g must be in (0, 1]", utilization);
  return 0;
}
#endif
