/* Embedding lookup at the staged token ids, and row gathers (the rows that need logits). */
#ifndef TESSERA_CUDA_EMBED_CUH
#define TESSERA_CUDA_EMBED_CUH

#include "cuda_common.cuh"

/* out[i][:] = table[tokens[i]][:]   table [vocab][d]; out [n][d] */
void cuda_op_embed(void *ctx, const ts_tensor *table, int n, int d, float *out);
/* out[i][:] = x[rows[i]][:]   rows in device memory, in host memory, or a run of the staged
 * batch's logits_rows (read from its staged copy) */
void cuda_op_gather_rows(void *ctx, const float *x, const int32_t *rows, int n, int d, float *out);

#endif
