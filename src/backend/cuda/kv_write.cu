/* Writes this step's K and V rows into the paged cache at the staged slots, narrowing to the
 * cache's dtype. One block per token. */
#include "kv_write.cuh"
#include "graph.cuh"

template <typename KT>
__global__ void kv_write_kernel(const float *k, const float *v, const int64_t *slot, int row,
                                KT *kc, KT *vc) {
  int t = blockIdx.x;
  int64_t s = slot[t];
  if (s < 0) return;
  const float *ks = k + (size_t)t * row, *vs = v + (size_t)t * row;
  KT *kd = kc + (size_t)s * row, *vd = vc + (size_t)s * row;
  for (int j = threadIdx.x; j < row; j += blockDim.x) {
    cuda_st(kd + j, ks[j]);
    cuda_st(vd + j, vs[j]);
  }
}

void cuda_op_kv_write(void *ctx, const kv_cache *kv, int layer, const float *k, const float *v) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (cuda_graph_op(c, CUDA_OP_KV_WRITE, k, v, kv->k[layer], layer, 0)) return;
  if (c->n_tokens <= 0) return;
  if (c->block_size != kv->block_size) {
    cuda_fail(c, TS_EINVAL, "CUDA kv_write: the step was staged for another KV cache");
    return;
  }
  int row = kv->n_kv_l * kv->head_dim;
  CUDA_DISPATCH_FLOAT(c, kv->dtype, "kv_write", KT,
                      kv_write_kernel<KT><<<c->n_tokens, 128, 0, c->stream>>>(
                          k, v, c->d_slot, row, (KT *)kv->k[layer], (KT *)kv->v[layer]);
                      CUDA_CHECK_LAUNCH(c, "kv_write_kernel"));
}
