/* The fused decode ops that put an RMSNorm into the prologue of the skinny product: q/k/v from
 * one launch, and gate/up with silu(gate) * up in the epilogue. A step the skinny kernel cannot
 * take (more than 8 rows, float32 weights, odd shapes) runs the plain ops instead, through the
 * same public entry points, so graph capture sees one consistent op sequence per shape. */
#include "act.cuh"
#include "fused.cuh"
#include "gemv.cuh"
#include "graph.cuh"
#include "matmul.cuh"
#include "norm.cuh"

void cuda_op_norm_matmul(void *ctx, const float *x, const ts_tensor *norm_w, float eps, int n,
                         int nw, const ts_tensor *const *w, const ts_tensor *const *bias,
                         float *const *y) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (n <= 0 || nw <= 0) return;
  if (nw > 3) {
    cuda_fail(c, TS_EINVAL, "CUDA norm_matmul: %d weights (at most 3)", nw);
    return;
  }
  const int k = (int)w[0]->shape[1];
  if (cuda_gemv_fused_fits(x, n, nw, w, bias, norm_w)) {
    if (cuda_graph_op(c, CUDA_OP_NORM_MATMUL, x, w[0]->data, y[0], n, nw)) return;
    cuda_gemv_fused(c, x, n, norm_w, eps, nw, w, bias, y, CUDA_GEMV_STORE);
    return;
  }
  float *xn = NULL;
  if (cuda_scratch_reserve(c, &c->fuse_ws, &c->fuse_ws_cap, (size_t)n * k * sizeof(float)))
    return;
  xn = (float *)c->fuse_ws;
  cuda_op_rmsnorm(c, x, norm_w, eps, n, k, xn);
  for (int i = 0; i < nw; i++) cuda_op_matmul(c, xn, w[i], bias ? bias[i] : NULL, n, y[i]);
}

void cuda_op_norm_gate_up(void *ctx, const float *x, const ts_tensor *norm_w, float eps, int n,
                          const ts_tensor *wg, const ts_tensor *wu, float *out) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (n <= 0) return;
  const ts_tensor *w[2] = {wg, wu};
  float *y[2] = {out, out};
  if (cuda_gemv_fused_fits(x, n, 2, w, NULL, norm_w) && wg->shape[0] == wu->shape[0]) {
    if (cuda_graph_op(c, CUDA_OP_NORM_GATE_UP, x, wg->data, out, n, 0)) return;
    cuda_gemv_fused(c, x, n, norm_w, eps, 2, w, NULL, y, CUDA_GEMV_SILU);
    return;
  }
  const int k = (int)wg->shape[1], ff = (int)wg->shape[0];
  size_t xn_bytes = ((size_t)n * k * sizeof(float) + 255) & ~(size_t)255;
  if (cuda_scratch_reserve(c, &c->fuse_ws, &c->fuse_ws_cap,
                           xn_bytes + (size_t)n * ff * sizeof(float)))
    return;
  float *xn = (float *)c->fuse_ws, *up = (float *)((char *)c->fuse_ws + xn_bytes);
  cuda_op_rmsnorm(c, x, norm_w, eps, n, k, xn);
  cuda_op_matmul(c, xn, wg, NULL, n, out);
  cuda_op_matmul(c, xn, wu, NULL, n, up);
  cuda_op_silu_mul(c, out, up, n, ff, out);
}
