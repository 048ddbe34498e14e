/* The compute backend: a vtable of ops over device buffers plus a void *ctx, behind an opaque
 * handle. The forward pass (model/forward.c) is written once over these ops; cpu/ and cuda/
 * implement them. Activations are float32 [rows][cols] row-major; weights are ts_tensor views in
 * any supported dtype. Optional slots may be NULL. */
#ifndef TESSERA_BACKEND_H
#define TESSERA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "engine/batch.h"
#include "model/config.h"
#include "util/status.h"
#include "util/tensor.h"

/* Paged KV cache of one rank: for each local layer, K and V of
 * [n_blocks][block_size][n_kv_l][head_dim] in dtype (kv_cache_dtype: F32 on the CPU backend,
 * BF16 on CUDA for a 16-bit model). */
typedef struct {
  int n_layers;
  int n_blocks;
  int block_size;
  int n_kv_l;
  int head_dim;
  ts_dtype dtype;
  void **k; /* [n_layers] device pointers */
  void **v; /* [n_layers] */
} kv_cache;

typedef struct {
  float theta;
  int interleaved; /* pairs (2i, 2i+1) instead of (i, i + hd/2) */
  rope_scaling_type scaling;
  float factor, low_freq_factor, high_freq_factor;
  int orig_max_pos;
} rope_params;

typedef struct backend_ops {
  const char *name;
  /* Memory. */
  void *(*alloc)(void *ctx, size_t bytes);
  void (*free)(void *ctx, void *ptr);
  void (*upload)(void *ctx, void *dst, const void *src, size_t bytes);   /* host -> device */
  void (*download)(void *ctx, void *dst, const void *src, size_t bytes); /* device -> host */
  /* Optional: make a mapped weight usable on the device (CUDA copies it; the CPU leaves the view
   * in the mapping). May rewrite t->data. */
  int (*weight_prepare)(void *ctx, ts_tensor *t, ts_err *err);
  void (*weight_release)(void *ctx, ts_tensor *t);

  /* Stage the step plan (positions, block tables, slots) for the ops that follow. */
  int (*step_begin)(void *ctx, const ts_batch *b, const kv_cache *kv, ts_err *err);

  /* out[i][:] = table[ids[i]][:]   table [vocab][d]; out [n][d] */
  void (*embed)(void *ctx, const ts_tensor *table, int n, int d, float *out);
  /* out = rmsnorm(x) * w           x, out [rows][dim]; w [dim] */
  void (*rmsnorm)(void *ctx, const float *x, const ts_tensor *w, float eps, int rows, int dim,
                  float *out);
  /* residual += x; out = rmsnorm(residual) * w */
  void (*add_rmsnorm)(void *ctx, float *residual, const float *x, const ts_tensor *w, float eps,
                      int rows, int dim, float *out);
  /* y = x @ w^T (+ bias)            x [n][k]; w [m][k]; bias [m] or NULL; y [n][m] */
  void (*matmul)(void *ctx, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
                 float *y);
  /* Rotates the q or k heads of every token at the staged positions. x [n_tokens][heads][hd] */
  void (*rope)(void *ctx, float *x, int heads, int hd, const rope_params *rp);
  /* Writes this step's k and v rows into layer `layer` of the cache at the staged slots.
   * k, v [n_tokens][n_kv_l][hd] */
  void (*kv_write)(void *ctx, const kv_cache *kv, int layer, const float *k, const float *v);
  /* Causal attention of this step's queries over the cached keys/values of their sequences
   * (which include this step's, already written). q, out [n_tokens][n_head_l][hd] */
  void (*attention)(void *ctx, const kv_cache *kv, int layer, const float *q, int n_head_l,
                    float scale, float *out);
  /* out = silu(gate) * up           gate, up, out [n][d] */
  void (*silu_mul)(void *ctx, const float *gate, const float *up, int n, int d, float *out);
  /* out[i][:] = x[rows[i]][:]       gathers the rows that need logits; x [*][d], out [n][d] */
  void (*gather_rows)(void *ctx, const float *x, const int32_t *rows, int n, int d, float *out);
  /* Optional: wait for queued device work (CUDA); NULL when every op is synchronous. */
  int (*sync)(void *ctx, ts_err *err);
  /* Optional: draws one token per row on the device, so only ids come back. logits
   * [n][vocab] device (modified: penalties, temperature); rows [n]; ids [n] host. Synchronous. */
  int (*sample)(void *ctx, float *logits, int n, int vocab, const ts_sample_row *rows,
                int32_t *ids, ts_err *err);
  /* Optional (NULL: F32): the KV cache dtype for the weights prepared so far. */
  ts_dtype (*kv_dtype)(void *ctx);

  /* Optional fused ops, fewer launches per layer (NULL on the CPU, where forward.c composes the
   * ops above). forward.c uses them when all four exist and the tensor-parallel size is 1. */
  /* y[i] = (rmsnorm(x) * norm_w) @ w[i]^T (+ bias[i]) for i < nw <= 3 (q, k, v share the input).
   * x [n][k] unchanged; y[i] [n][rows of w[i]]; a bias may be NULL or hold no data. */
  void (*norm_matmul)(void *ctx, const float *x, const ts_tensor *norm_w, float eps, int n,
                      int nw, const ts_tensor *const *w, const ts_tensor *const *bias,
                      float *const *y);
  /* out = silu(xn @ wg^T) * (xn @ wu^T), xn = rmsnorm(x) * norm_w.   x [n][k]; out [n][ff] */
  void (*norm_gate_up)(void *ctx, const float *x, const ts_tensor *norm_w, float eps, int n,
                       const ts_tensor *wg, const ts_tensor *wu, float *out);
  /* y += x @ w^T: the residual add in the product.   x [n][k]; w [m][k]; y [n][m] */
  void (*matmul_add)(void *ctx, const float *x, const ts_tensor *w, int n, float *y);
  /* Per-head RMSNorm of q and k (q_norm, k_norm NULL: none), RoPE at the staged positions, then
   * k and v written to layer `layer` of the cache as kv_write does. q, k rotated in place.
   * q [n_tokens][nh][hd]; k, v [n_tokens][n_kv_l][hd] */
  void (*qk_rope_kv)(void *ctx, const kv_cache *kv, int layer, float *q, float *k,
                     const float *v, int nh, const ts_tensor *q_norm, const ts_tensor *k_norm,
                     float eps, const rope_params *rp);
} backend_ops;

typedef struct backend {
  const backend_ops *ops;
  void *ctx;
  void (*destroy)(struct backend *b);
} backend;

/* Creates a backend by name: "cpu" (threads: 0 = all cores) or "cuda". */
int backend_create(backend **out, const char *device, int threads, ts_err *err);
void backend_destroy(backend *b);

/* The KV cache dtype of a backend once the model is loaded: BF16 on CUDA for 16-bit weights
 * (TESSERA_KV_DTYPE=f32 keeps float32), else F32. */
ts_dtype kv_cache_dtype(const backend *be);
int kv_cache_create(kv_cache *kv, backend *be, int n_layers, int n_blocks, int block_size,
                    int n_kv_l, int head_dim, ts_err *err);
void kv_cache_free(kv_cache *kv, backend *be);

#endif
