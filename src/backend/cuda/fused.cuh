/* Fused decode ops: RMSNorm in the prologue of the skinny product (q/k/v in one launch;
 * gate/up with silu * mul in the epilogue). The residual-add product and the q/k-norm + RoPE +
 * KV write live with their families (matmul.cuh, rope.cuh). */
#ifndef TESSERA_CUDA_FUSED_CUH
#define TESSERA_CUDA_FUSED_CUH

#include "cuda_common.cuh"

/* backend ops norm_matmul and norm_gate_up (backend.h) */
void cuda_op_norm_matmul(void *ctx, const float *x, const ts_tensor *norm_w, float eps, int n,
                         int nw, const ts_tensor *const *w, const ts_tensor *const *bias,
                         float *const *y);
void cuda_op_norm_gate_up(void *ctx, const float *x, const ts_tensor *norm_w, float eps, int n,
                          const ts_tensor *wg, const ts_tensor *wu, float *out);

#endif
