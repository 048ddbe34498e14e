/* Embedding lookup at the staged token ids, and row gathers. One block per output row; ids
 * outside the table give a zero row (the engine validates ids; a kernel cannot report). */
#include "embed.cuh"
#include "graph.cuh"

template <typename T>
__global__ void embed_kernel(const T *table, int64_t stride, int vocab, const int32_t *ids, int d,
                             float *out) {
  cuda_pdl_trigger(); /* launched plainly (after the plan's copy); its successor may start */
  int i = blockIdx.x;
  int id = ids[i];
  float *o = out + (size_t)i * d;
  if (id < 0 || id >= vocab) {
    for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = 0.0f;
    return;
  }
  const T *row = table + (size_t)id * stride;
  for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = cuda_ld(row + j);
}

void cuda_op_embed(void *ctx, const ts_tensor *table, int n, int d, float *out) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (cuda_graph_op(c, CUDA_OP_EMBED, table->data, out, NULL, n, d)) return;
  if (n <= 0) return;
  if (n > c->n_tokens) {
    cuda_fail(c, TS_EINVAL, "CUDA embed: %d rows but the step has %d tokens", n, c->n_tokens);
    return;
  }
  int64_t stride = cuda_weight_stride(table);
  int vocab = (int)table->shape[0];
  CUDA_DISPATCH_FLOAT(c, table->dtype, "embed", T,
                      embed_kernel<T><<<n, 256, 0, c->stream>>>((const T *)table->data, stride,
                                                               vocab, c->d_tokens, d, out);
                      CUDA_CHECK_LAUNCH(c, "embed_kernel"));
}

__global__ void gather_rows_kernel(const float *x, const int32_t *rows, int d, float *out) {
  cuda_pdl_wait();
  cuda_pdl_trigger();
  int i = blockIdx.x;
  const float *src = x + (size_t)rows[i] * d;
  float *o = out + (size_t)i * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = src[j];
}

void cuda_op_gather_rows(void *ctx, const float *x, const int32_t *rows, int n, int d,
                         float *out) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  /* rows is left out of the hash: a host array may move between steps of one shape. */
  if (cuda_graph_op(c, CUDA_OP_GATHER_ROWS, x, out, NULL, n, d)) return;
  if (n <= 0) return;
  const int32_t *drows = rows;
  const int32_t *lr = c->host_logits_rows;
  if (lr && rows >= lr && rows + n <= lr + c->n_logits) {
    drows = c->d_logits_rows + (rows - lr); /* a run of the batch's rows, staged by step_begin */
  } else {
    cudaPointerAttributes a;
    cudaError_t e = cudaPointerGetAttributes(&a, rows);
    if (e != cudaSuccess) cudaGetLastError();
    if (e != cudaSuccess || (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged)) {
      /* Host indices that step_begin did not see: copy them (pageable: copied out at once). */
      if (cuda_scratch_reserve(c, (void **)&c->rows_dev, &c->rows_cap, (size_t)n * 4)) return;
      if (CUDA_CHECK(c, cudaMemcpyAsync(c->rows_dev, rows, (size_t)n * 4,
                                        cudaMemcpyHostToDevice, c->stream)))
        return;
      drows = c->rows_dev;
    }
  }
  cuda_launch_pdl(c, gather_rows_kernel, dim3(n), dim3(256), 0, x, drows, d, out);
  CUDA_CHECK_LAUNCH(c, "gather_rows_kernel");
}
