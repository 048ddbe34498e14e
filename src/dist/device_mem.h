/* KV-cache sizing from the device's memory, as vLLM's --gpu-memory-utilization means it: this
 * process may use `utilization` of the GPU's total memory, and the KV cache gets what is left of
 * that after the weights and activations (already allocated when this is called). */
#ifndef TESSERA_DEVICE_MEM_H
#define TESSERA_DEVICE_MEM_H

#include <stdint.h>

#include "backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DEVICE_MEM_UTILIZATION_DEFAULT 0.9

/* *kv_bytes = utilization * total - (total - free) on the backend's GPU. A backend that is not
 * CUDA gives 0 (no device limit: the caller keeps its own sizing). Fails with one line when
 * nothing is left for the cache. */
int device_kv_budget(backend *be, double utilization, int64_t *kv_bytes, ts_err *err);

#ifdef __cplusplus
}
#endif

#endif
