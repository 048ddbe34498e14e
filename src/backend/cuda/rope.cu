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

/* q/k-norm + RoPE + KV write in one launch: grid (n_tokens, nh + n_kv), one block per head of
 * a token. A q head is normalised (q_norm) and rotated in place; a k head likewise, then written
 * to the cache with its v head at the token's slot. Same arithmetic as rmsnorm_kernel (float32
 * sum of squares, (x * inv) * w) and rope_kernel. */
template <typename KT>
__global__ void qk_rope_kv_kernel(float *q, float *k, const float *v, const int32_t *pos,
                                  const int64_t *slot, int nh, int nkv, int hd, const void *qn,
                                  const void *kn, int norm_dtype, float eps, rope_args ra,
                                  KT *kc, KT *vc) {
  __shared__ float part[4];
  __shared__ float s_inv;
  cuda_pdl_wait();
  cuda_pdl_trigger();
  const int t = blockIdx.x, h = blockIdx.y;
  const bool is_q = h < nh;
  const int kh = h - nh;
  float *row = is_q ? q + ((size_t)t * nh + h) * hd : k + ((size_t)t * nkv + kh) * hd;
  const void *nw = is_q ? qn : kn;
  const int half = hd / 2;
  /* Thread i owns the pair (i0, i1) of pair index i (one pass: hd / 2 <= blockDim.x). */
  const int i = threadIdx.x;
  const bool own = i < half;
  const int i0 = ra.interleaved ? 2 * i : i, i1 = ra.interleaved ? 2 * i + 1 : i + half;
  float x0 = own ? row[i0] : 0.0f, x1 = own ? row[i1] : 0.0f;
  if (nw) {
    float ss = cuda_warp_sum(x0 * x0 + x1 * x1);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
      float tot = 0.0f;
      for (int w = 0; w < (int)(blockDim.x + 31) / 32; w++) tot += part[w];
      s_inv = 1.0f / sqrtf(tot / (float)hd + eps);
    }
    __syncthreads();
    if (own) {
      float w0, w1;
      if (norm_dtype == TS_F32) {
        w0 = ((const float *)nw)[i0];
        w1 = ((const float *)nw)[i1];
      } else if (norm_dtype == TS_BF16) {
        w0 = cuda_ld((const __nv_bfloat16 *)nw + i0);
        w1 = cuda_ld((const __nv_bfloat16 *)nw + i1);
      } else {
        w0 = cuda_ld((const __half *)nw + i0);
        w1 = cuda_ld((const __half *)nw + i1);
      }
      x0 = x0 * s_inv * w0;
      x1 = x1 * s_inv * w1;
    }
  }
  if (!own) return;
  float ang = (float)pos[t] * rope_inv_freq(ra, i, hd);
  float s, co;
  sincosf(ang, &s, &co);
  const float y0 = x0 * co - x1 * s, y1 = x0 * s + x1 * co;
  row[i0] = y0;
  row[i1] = y1;
  if (is_q) return;
  const int64_t sl = slot[t];
  if (sl < 0) return;
  const size_t base = ((size_t)sl * nkv + kh) * hd;
  cuda_st(kc + base + i0, y0);
  cuda_st(kc + base + i1, y1);
  const float *vr = v + ((size_t)t * nkv + kh) * hd;
  cuda_st(vc + base + i0, vr[i0]);
  cuda_st(vc + base + i1, vr[i1]);
}

void cuda_op_qk_rope_kv(void *ctx, const kv_cache *kv, int layer, float *q, float *k,
                        const float *v, int nh, const ts_tensor *q_norm, const ts_tensor *k_norm,
                        float eps, const rope_params *rp) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (cuda_graph_op(c, CUDA_OP_QK_ROPE_KV, q, k, kv->k[layer], nh, layer)) return;
  const int nkv = kv->n_kv_l, hd = kv->head_dim;
  if (c->n_tokens <= 0 || nh <= 0) return;
  if (c->block_size != kv->block_size) {
    cuda_fail(c, TS_EINVAL, "CUDA qk_rope_kv: the step was staged for another KV cache");
    return;
  }
  if (hd < 2 || hd % 2 || hd > 256) {
    cuda_fail(c, TS_EUNSUPPORTED, "CUDA qk_rope_kv: head_dim %d not supported (even, <= 256)", hd);
    return;
  }
  const ts_tensor *qn = q_norm && q_norm->data ? q_norm : NULL;
  const ts_tensor *kn = k_norm && k_norm->data ? k_norm : NULL;
  if ((qn == NULL) != (kn == NULL) || (qn && qn->dtype != kn->dtype) ||
      (qn && qn->dtype != TS_F32 && qn->dtype != TS_BF16 && qn->dtype != TS_F16)) {
    cuda_fail(c, TS_EUNSUPPORTED, "CUDA qk_rope_kv: q/k norm weights must both exist, of one "
                                  "dtype (F32, BF16 or F16)");
    return;
  }
  rope_args a;
  a.theta = rp->theta;
  a.interleaved = rp->interleaved;
  a.llama3 = rp->scaling == ROPE_SCALING_LLAMA3;
  a.factor = rp->factor;
  a.low_freq_factor = rp->low_freq_factor;
  a.high_freq_factor = rp->high_freq_factor;
  a.orig_max_pos = (float)rp->orig_max_pos;
  if (a.llama3 && (a.factor <= 0 || a.high_freq_factor <= a.low_freq_factor || a.orig_max_pos <= 0)) {
    cuda_fail(c, TS_EINVAL, "CUDA qk_rope_kv: invalid llama3 scaling parameters");
    return;
  }
  const int threads = (hd / 2 + 31) / 32 * 32;
  dim3 grid((unsigned)c->n_tokens, (unsigned)(nh + nkv));
  CUDA_DISPATCH_FLOAT(c, kv->dtype, "qk_rope_kv cache", KT,
                      cuda_launch_pdl(c, qk_rope_kv_kernel<KT>, grid, dim3(threads), 0,
                          q, k, v, (const int32_t *)c->d_pos, (const int64_t *)c->d_slot, nh,
                          nkv, hd, qn ? qn->data : NULL, kn ? kn->data : NULL,
                          qn ? (int)qn->dtype : 0, eps, a, (KT *)kv->k[layer],
                          (KT *)kv->v[layer]);
                      CUDA_CHECK_LAUNCH(c, "qk_rope_kv_kernel"));
}
