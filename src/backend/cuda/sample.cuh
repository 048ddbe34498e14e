/* Token sampling on the device: penalties, temperature, min-p / top-k / top-p truncation and a
 * counter-based draw per logits row, so a step returns token ids instead of logits. */
#ifndef TESSERA_CUDA_SAMPLE_CUH
#define TESSERA_CUDA_SAMPLE_CUH

#include "cuda_common.cuh"

/* The backend op `sample` (backend.h). */
int cuda_op_sample(void *ctx, float *logits, int n, int vocab, const ts_sample_row *rows,
                   int32_t *ids, ts_err *err);

#endif
