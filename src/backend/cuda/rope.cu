/* Rotary position embedding at the staged positions. NEOX pairs (i, i + hd/2) by default,
 * adjacent pairs (2i, 2i+1) when interleaved; llama3 frequency scaling. The inverse frequency is
 * computed in double and rounded once, and the angle in float32 as transformers does, so CPU and
 * GPU agree to the rounding of sin/cos. */
#include "rope.cuh"
#include "graph.cuh"

struct rope_args {
  float theta;
  int interleaved;
  int llama3;
  float factor, low_freq_factor, high_freq_factor;
  float orig_max_pos;
};

__device__ float rope_inv_freq(const rope_args &a, int i, int hd) {
  double f = 1.0 / pow((double)a.theta, (double)(2 * i) / (double)hd);
  if (a.llama3) {
    const double pi = 3.14159265358979323846;
    double wavelen = 2.0 * pi / f;
    double low_wavelen = a.orig_max_pos / a.low_freq_factor;
    double high_wavelen = a.orig_max_pos / a.high_freq_factor;
    if (wavelen > low_wavelen) {
      f = f / a.factor;
    } else if (wavelen >= high_wavelen) {
      double smooth = (a.orig_max_pos / wavelen - a.low_freq_factor) /
                      (a.high_freq_factor - a.low_freq_factor);
      f = (1.0 - smooth) * f / a.factor + smooth * f;
    }
  }
  return (float)f;
}

/* grid (n_tokens, heads); one thread per rotated pair. */
__global__ void rope_kernel(float *x, const int32_t *pos, int heads, int hd, rope_args a) {
  int t = blockIdx.x, h = blockIdx.y;
  float *row = x + ((size_t)t * heads + h) * hd;
  float p = (float)pos[t];
  for (int i = threadIdx.x; i < hd / 2; i += blockDim.x) {
    float ang = p * rope_inv_freq(a, i, hd);
    float s, co;
    sincosf(ang, &s, &co);
    int i0 = a.interleaved ? 2 * i : i;
    int i1 = a.interleaved ? 2 * i + 1 : i + hd / 2;
    float x0 = row[i0], x1 = row[i1];
    row[i0] = x0 * co - x1 * s;
    row[i1] = x0 * s + x1 * co;
  }
}

void cuda_op_rope(void *ctx, float *x, int heads, int hd, const rope_params *rp) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (cuda_graph_op(c, CUDA_OP_ROPE, x, NULL, NULL, heads, hd)) return;
  if (c->n_tokens <= 0 || heads <= 0 || hd < 2) return;
  rope_args a;
  a.theta = rp->theta;
  a.interleaved = rp->interleaved;
  a.llama3 = rp->scaling == ROPE_SCALING_LLAMA3;
  a.factor = rp->factor;
  a.low_freq_factor = rp->low_freq_factor;
  a.high_freq_factor = rp->high_freq_factor;
  a.orig_max_pos = (float)rp->orig_max_pos;
  if (a.llama3 && (a.factor <= 0 || a.high_freq_factor <= a.low_freq_factor || a.orig_max_pos <= 0)) {
    cuda_fail(c, TS_EINVAL, "CUDA rope: invalid llama3 scaling parameters");
    return;
  }
  int threads = hd / 2 < 128 ? ((hd / 2 + 31) / 32) * 32 : 128;
  rope_kernel<<<dim3((unsigned)c->n_tokens, (unsigned)heads), threads, 0, c->stream>>>(
      x, c->d_pos, heads, hd, a);
  CUDA_CHECK_LAUNCH(c, "rope_kernel");
}
