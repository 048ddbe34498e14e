/* The CUDA backend's public entry point: a C header, usable from C and from the CUDA sources. */
#ifndef TESSERA_BACKEND_CUDA_H
#define TESSERA_BACKEND_CUDA_H

#include "backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Creates the CUDA backend on device `device_index`. Fails with one line ("no CUDA device: ...")
 * when the machine has no usable GPU or driver. */
int backend_cuda_create(backend **out, int device_index, ts_err *err);

#ifdef __cplusplus
}
#endif

#endif
