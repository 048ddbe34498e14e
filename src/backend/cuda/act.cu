/* Gated activations: out = silu(gate) * up, elementwise over [n][d]. */
#include "act.cuh"
#include "graph.cuh"

__global__ void silu_mul_kernel(const float *gate, const float *up, int64_t count, float *out) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count;
       i += (int64_t)gridDim.x * blockDim.x) {
    float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

int cuda_silu_mul_launch(cuda_ctx *c, const float *gate, const float *up, int64_t count,
                         float *out) {
  if (count <= 0) return 0;
  unsigned blocks = cuda_blocks(count, 256);
  unsigned cap = (unsigned)c->sm_count * 16;
  silu_mul_kernel<<<blocks < cap ? blocks : cap, 256, 0, c->stream>>>(gate, up, count, out);
  return CUDA_CHECK_LAUNCH(c, "silu_mul_kernel");
}

void cuda_op_silu_mul(void *ctx, const float *gate, const float *up, int n, int d, float *out) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (cuda_graph_op(c, CUDA_OP_SILU_MUL, gate, up, out, n, d)) return;
  cuda_silu_mul_launch(c, gate, up, (int64_t)n * d, out);
}
