/* The fused decode ops that put an RMSNorm into the prologue of the skinny product: q/k/v from
 * one launch, and gate/up with silu(gate) * up in the epilogue. A step the skinny kernel cannot
 * take (more than 8 rows) with 16-bit weights normalises once straight into a 16-bit buffer that
 * every cuBLAS product of the block reads (no narrowing pass per product); anything else (float32
 * weights, odd shapes) runs the plain ops through their public entry points, so graph capture
 * sees one consistent op sequence per shape. */
#include "act.cuh"
#include "fused.cuh"
#include "gemv.cuh"
#include "graph.cuh"
#include "matmul.cuh"
#include "norm.cuh"

/* Every weight 2-D, 16-bit and of one dtype with one k (a bias may be anything: the bias kernel
 * reads any float type); the norm weight F32, BF16 or F16. */
static int narrow_ok(int nw, const ts_tensor *const *w, const ts_tensor *norm_w) {
  if (norm_w->dtype != TS_F32 && norm_w->dtype != TS_BF16 && norm_w->dtype != TS_F16) return 0;
  for (int i = 0; i < nw; i++)
    if (w[i]->ndim != 2 || (w[i]->dtype != TS_BF16 && w[i]->dtype != TS_F16) ||
        w[i]->dtype != w[0]->dtype || w[i]->shape[1] != w[0]->shape[1])
      return 0;
  return 1;
}

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
  if (narrow_ok(nw, w, norm_w)) {
    if (cuda_graph_op(c, CUDA_OP_NORM_MATMUL, x, w[0]->data, y[0], n, -nw)) return;
    if (cuda_scratch_reserve(c, &c->fuse_ws, &c->fuse_ws_cap, (size_t)n * k * 2)) return;
    if (cuda_rmsnorm_narrow(c, x, norm_w, eps, n, k, c->fuse_ws, w[0]->dtype)) return;
    for (int i = 0; i < nw; i++)
      if (cuda_matmul_narrowed(c, c->fuse_ws, w[i], bias ? bias[i] : NULL, n, y[i])) return;
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
  if (narrow_ok(2, w, norm_w) && wg->shape[0] == wu->shape[0]) {
    if (cuda_graph_op(c, CUDA_OP_NORM_GATE_UP, x, wg->data, out, n, -1)) return;
    size_t x16 = ((size_t)n * k * 2 + 255) & ~(size_t)255;
    if (cuda_scratch_reserve(c, &c->fuse_ws, &c->fuse_ws_cap, x16 + (size_t)n * ff * sizeof(float)))
      return;
    float *up = (float *)((char *)c->fuse_ws + x16);
    if (cuda_rmsnorm_narrow(c, x, norm_w, eps, n, k, c->fuse_ws, wg->dtype) ||
        cuda_matmul_narrowed(c, c->fuse_ws, wg, NULL, n, out) ||
        cuda_matmul_narrowed(c, c->fuse_ws, wu, NULL, n, up))
      return;
    cuda_silu_mul_launch(c, out, up, (int64_t)n * ff, out);
    return;
  }
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
