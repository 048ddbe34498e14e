/* Backend selection by device name. The CUDA backend plugs in through backend_cuda_create when
 * it is compiled in (TESSERA_HAVE_CUDA). */
#include "backend/backend.h"

#include <string.h>

#include "backend/cpu/cpu_backend.h"

#ifdef TESSERA_HAVE_CUDA
#include "backend/cuda/backend_cuda.h"
#endif

int backend_create(backend **out, const char *device, int threads, ts_err *err) {
  *out = NULL;
  if (!device || !strcmp(device, "cpu")) return backend_cpu_create(out, threads, err);
  if (!strcmp(device, "cuda")) {
#ifdef TESSERA_HAVE_CUDA
    return backend_cuda_create(out, 0, err);
#else
    return ts_errorf(err, TS_EUNSUPPORTED,
                     "device 'cuda' is not available: this build has no CUDA backend (rebuild "
                     "with nvcc installed, or use --device cpu)");
#endif
  }
  return ts_errorf(err, TS_EINVAL, "unknown device '%s' (expected cpu or cuda)", device);
}

void backend_destroy(backend *b) {
  if (b && b->destroy) b->destroy(b);
}
