/* The CUDA backend: device selection, the context, device memory, weight upload, staging of the
 * step plan (one pinned buffer, one async copy), error reporting, and the ops table. The kernels
 * live in one .cu file per op family. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "act.cuh"
#include "attention.cuh"
#include "backend_cuda.h"
#include "cuda_common.cuh"
#include "embed.cuh"
#include "fused.cuh"
#include "graph.cuh"
#include "kv_write.cuh"
#include "matmul.cuh"
#include "norm.cuh"
#include "rope.cuh"
#include "sample.cuh"

#define CUDA_CUBLAS_WS_BYTES ((size_t)32 << 20)

static double host_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

void cuda_fail(cuda_ctx *c, int code, const char *fmt, ...) {
  if (c->err_code) return; /* keep the first: later failures are usually its consequences */
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->err_msg, sizeof c->err_msg, fmt, ap);
  va_end(ap);
  c->err_code = code;
}

int cuda_check_at(cuda_ctx *c, cudaError_t e, const char *what, const char *file, int line) {
  if (e == cudaSuccess) return 0;
  int code = e == cudaErrorMemoryAllocation ? TS_ENOMEM : TS_EINTERNAL;
  cuda_fail(c, code, "CUDA error %s (%s) in %s at %s:%d; check the device with nvidia-smi",
            cudaGetErrorName(e), cudaGetErrorString(e), what, file, line);
  return -1;
}

int cublas_check_at(cuda_ctx *c, cublasStatus_t s, const char *what, const char *file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return 0;
  int code = s == CUBLAS_STATUS_ALLOC_FAILED ? TS_ENOMEM : TS_EINTERNAL;
  cuda_fail(c, code, "cuBLAS error %s in %s at %s:%d", cublasGetStatusName(s), what, file, line);
  return -1;
}

int cuda_scratch_reserve(cuda_ctx *c, void **buf, size_t *cap, size_t bytes) {
  if (*cap >= bytes && *buf) return 0;
  if (c->gmode == CUDA_GRAPH_CAPTURE) {
    /* Cannot happen for a shape that ran eagerly first; freeing now would break the capture. */
    cuda_fail(c, TS_EINTERNAL, "CUDA graph capture needs a larger scratch buffer (%zu bytes; "
              "run with TESSERA_CUDA_GRAPHS=0)", bytes);
    return -1;
  }
  cuda_graph_clear(c); /* graphs hold the old buffer's address */
  size_t want = bytes + bytes / 4 + 256;
  if (*buf) {
    CUDA_CHECK(c, cudaFree(*buf));
    *buf = NULL;
    *cap = 0;
  }
  if (CUDA_CHECK(c, cudaMalloc(buf, want))) {
    *buf = NULL;
    return -1;
  }
  *cap = want;
  return 0;
}

/* Reports the sticky error into err (one line) and returns its code. */
static int cuda_report(cuda_ctx *c, ts_err *err) {
  if (!c->err_code) return 0;
  return ts_errorf(err, c->err_code, "%s", c->err_msg);
}

/* ---- memory ---- */

static void *cuda_alloc(void *ctx, size_t bytes) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  void *p = NULL;
  if (CUDA_CHECK(c, cudaMalloc(&p, bytes ? bytes : 1))) return NULL;
  return p;
}

static void cuda_free(void *ctx, void *ptr) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (ptr) CUDA_CHECK(c, cudaFree(ptr));
}

/* Pageable sources are copied out before cudaMemcpyAsync returns, so the caller may reuse src. */
static void cuda_upload(void *ctx, void *dst, const void *src, size_t bytes) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  cuda_graph_flush(c);
  if (bytes) CUDA_CHECK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream));
}

void cuda_stats_ready(cuda_ctx *c) {
  if (c->step_timed) cudaEventRecord(c->ev_ready, c->stream);
}

void cuda_stats_done(cuda_ctx *c) {
  if (!c->step_timed) return;
  float ms = 0;
  cudaEventElapsedTime(&ms, c->ev_step, c->ev_ready);
  c->gpu_ms += ms;
  c->wall_ms += host_ms() - c->step_t0;
  c->n_steps++;
  c->step_timed = 0;
}

/* The one host synchronisation of a step: the logits coming back (sampled ids come back
 * through the sample op). */
static void cuda_download(void *ctx, void *dst, const void *src, size_t bytes) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  cuda_prof_mark(c, 0);
  if (cuda_graph_flush(c) || !bytes) return;
  cuda_stats_ready(c);
  if (CUDA_CHECK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream))) return;
  CUDA_CHECK(c, cudaStreamSynchronize(c->stream));
  cuda_stats_done(c); /* the step's first download: its logits are ready */
}

static int cuda_sync(void *ctx, ts_err *err) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  cuda_prof_mark(c, 0);
  cuda_graph_flush(c);
  CUDA_CHECK(c, cudaStreamSynchronize(c->stream));
  return cuda_report(c, err);
}

/* ---- weights ---- */

/* F32, BF16 and F16 weights are copied as they are (F32 keeps full precision through
 * cublasSgemm); a column shard's row stride is packed away so the copy holds only this rank's
 * part. Quantized GGUF types are not supported yet. */
static int cuda_weight_prepare(void *ctx, ts_tensor *t, ts_err *err) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (!t->data) return 0;
  /* The current device is per thread, and weights may be loaded from another thread. */
  cudaError_t e = cudaSetDevice(c->device);
  if (e != cudaSuccess)
    return ts_errorf(err, TS_EINTERNAL, "CUDA backend: cannot select device %d: %s", c->device,
                     cudaGetErrorString(e));
  if (t->dtype != TS_F32 && t->dtype != TS_BF16 && t->dtype != TS_F16 && t->dtype != TS_I32)
    return ts_errorf(err, TS_EUNSUPPORTED,
                     "CUDA backend: weight dtype %s not supported (use F32, BF16 or F16 weights)",
                     ts_dtype_table[t->dtype].name);
  int64_t n = ts_tensor_nelem(t);
  size_t bytes = ts_dtype_bytes(t->dtype, n);
  void *dev = NULL;
  e = cudaMalloc(&dev, bytes ? bytes : 1);
  if (e != cudaSuccess)
    return ts_errorf(err, TS_ENOMEM, "CUDA backend: cannot allocate %zu bytes for a weight: %s",
                     bytes, cudaGetErrorString(e));
  if (t->ndim >= 2) {
    int64_t cols = t->shape[t->ndim - 1];
    int64_t rows = n / (cols ? cols : 1);
    size_t pitch_src = ts_dtype_bytes(t->dtype, cuda_weight_stride(t));
    size_t width = ts_dtype_bytes(t->dtype, cols);
    e = cudaMemcpy2D(dev, width, t->data, pitch_src, width, (size_t)rows, cudaMemcpyHostToDevice);
  } else {
    e = cudaMemcpy(dev, t->data, bytes, cudaMemcpyHostToDevice);
  }
  if (e != cudaSuccess) {
    cudaFree(dev);
    return ts_errorf(err, TS_EIO, "CUDA backend: weight upload failed: %s", cudaGetErrorString(e));
  }
  t->data = dev;
  if (t->ndim >= 2) t->row_stride = t->shape[t->ndim - 1];
  if (t->ndim >= 2 && (t->dtype == TS_BF16 || t->dtype == TS_F16)) c->weights_16bit = 1;
  return 0;
}

/* A model of 16-bit matrices gets a bf16 cache: its K/V were computed from 16-bit weights, and a
 * decode step streams half the bytes. A float32 model keeps float32. */
static ts_dtype cuda_kv_dtype(void *ctx) {
  return ((cuda_ctx *)ctx)->weights_16bit ? TS_BF16 : TS_F32;
}

static void cuda_weight_release(void *ctx, ts_tensor *t) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (!t->data) return;
  cudaPointerAttributes a;
  /* Only free what lives on the device: a weight that was never prepared is still a host view. */
  if (cudaPointerGetAttributes(&a, t->data) == cudaSuccess && a.type == cudaMemoryTypeDevice)
    CUDA_CHECK(c, cudaFree(t->data));
  else
    cudaGetLastError();
  t->data = NULL;
}

/* ---- step plan ---- */

static size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

static int cuda_step_begin(void *ctx, const ts_batch *b, const kv_cache *kv, ts_err *err) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  cuda_graph_flush(c); /* the previous step's recorded or skipped work must run */
  TS_TRY(cuda_report(c, err));
  /* The step's ops run on this thread: make it use the backend's device. */
  if (CUDA_CHECK(c, cudaSetDevice(c->device))) return cuda_report(c, err);
  int nt = b->n_tokens, ns = b->n_seqs, mb = b->max_blocks, nl = b->n_logits;
  if (nt < 0 || ns < 0 || mb < 0 || nl < 0 || (ns > 0 && !b->seq_start))
    return ts_errorf(err, TS_EINVAL, "CUDA step_begin: malformed step plan");
  if (ns > 0 && (b->seq_start[0] != 0 || b->seq_start[ns] != nt))
    return ts_errorf(err, TS_EINVAL, "CUDA step_begin: seq_start does not cover the %d tokens", nt);
  int bs = kv ? kv->block_size : 0;

  /* Tiles of each size: every sequence's tokens cut into runs of at most tq. */
  int n_tiles[CUDA_ATTN_TQ_COUNT];
  for (int q = 0; q < CUDA_ATTN_TQ_COUNT; q++) {
    int tq = 1 << q, cnt = 0;
    for (int s = 0; s < ns; s++) cnt += (b->seq_start[s + 1] - b->seq_start[s] + tq - 1) / tq;
    n_tiles[q] = cnt;
  }

  size_t off_tokens = 0;
  size_t off_pos = off_tokens + align16((size_t)nt * 4);
  size_t off_ss = off_pos + align16((size_t)nt * 4);
  size_t off_ctx = off_ss + align16((size_t)(ns + 1) * 4);
  size_t off_bt = off_ctx + align16((size_t)ns * 4);
  size_t off_lr = off_bt + align16((size_t)ns * (size_t)mb * 4);
  size_t off_tiles[CUDA_ATTN_TQ_COUNT];
  size_t off = off_lr + align16((size_t)nl * 4);
  for (int q = 0; q < CUDA_ATTN_TQ_COUNT; q++) {
    off_tiles[q] = off;
    off += align16((size_t)n_tiles[q] * 8);
  }
  size_t off_slot = off;
  size_t total = off_slot + align16((size_t)nt * 8);

  /* The previous step's copy must have left the pinned buffer before it is rewritten. */
  if (CUDA_CHECK(c, cudaEventSynchronize(c->plan_copied))) return cuda_report(c, err);
  if (total > c->plan_cap) {
    size_t want = total + total / 2 + 4096;
    cuda_graph_clear(c); /* graphs hold the old plan's addresses */
    if (c->plan_host) cudaFreeHost(c->plan_host);
    if (c->plan_dev) cudaFree(c->plan_dev);
    c->plan_host = c->plan_dev = NULL;
    c->plan_cap = 0;
    if (CUDA_CHECK(c, cudaMallocHost(&c->plan_host, want)) ||
        CUDA_CHECK(c, cudaMalloc(&c->plan_dev, want)))
      return cuda_report(c, err);
    c->plan_cap = want;
  }
  char *h = (char *)c->plan_host;
  int32_t *h_pos = (int32_t *)(h + off_pos);
  int32_t *h_ss = (int32_t *)(h + off_ss);
  int64_t *h_slot = (int64_t *)(h + off_slot);
  if (nt) {
    memcpy(h + off_tokens, b->tokens, (size_t)nt * 4);
    memcpy(h_pos, b->pos, (size_t)nt * 4);
  }
  if (ns) {
    memcpy(h_ss, b->seq_start, (size_t)(ns + 1) * 4);
    memcpy(h + off_ctx, b->ctx_len, (size_t)ns * 4);
    if (mb) memcpy(h + off_bt, b->block_table, (size_t)ns * (size_t)mb * 4);
  }
  if (nl) memcpy(h + off_lr, b->logits_rows, (size_t)nl * 4);

  int max_ctx = 0;
  for (int s = 0; s < ns; s++) {
    if (b->ctx_len[s] > max_ctx) max_ctx = b->ctx_len[s];
    for (int t = b->seq_start[s]; t < b->seq_start[s + 1]; t++) {
      int p = b->pos[t];
      if (p < 0 || p >= b->ctx_len[s])
        return ts_errorf(err, TS_EINVAL,
                         "CUDA step_begin: token %d at position %d outside its context of %d", t,
                         p, b->ctx_len[s]);
      if (bs <= 0) {
        h_slot[t] = -1;
        continue;
      }
      if (p / bs >= mb)
        return ts_errorf(err, TS_EINVAL,
                         "CUDA step_begin: position %d needs block %d but the table has %d", p,
                         p / bs, mb);
      int blk = b->block_table[(size_t)s * (size_t)mb + (size_t)(p / bs)];
      if (blk < 0 || blk >= kv->n_blocks)
        return ts_errorf(err, TS_EINVAL, "CUDA step_begin: block id %d outside the cache of %d",
                         blk, kv->n_blocks);
      h_slot[t] = (int64_t)blk * bs + p % bs;
    }
  }
  for (int q = 0; q < CUDA_ATTN_TQ_COUNT; q++) {
    int32_t *tl = (int32_t *)(h + off_tiles[q]);
    int tq = 1 << q, k = 0;
    for (int s = 0; s < ns; s++)
      for (int t = b->seq_start[s]; t < b->seq_start[s + 1]; t += tq) {
        tl[2 * k] = s;
        tl[2 * k + 1] = t;
        k++;
      }
  }

  /* A decode step (one token per sequence) can be replayed from a graph: round the context up
   * to a power of two so the attention split, which depends on it, changes rarely. */
  int graph_step = nt > 0 && nt == ns && kv && c->graphs_enabled;
  if (graph_step) {
    int bucket = 256;
    while (bucket < max_ctx) bucket *= 2;
    max_ctx = bucket;
  }
  if (c->gmode == CUDA_GRAPH_CAPTURE) cuda_graph_flush(c); /* never copy inside a capture */
  if (CUDA_CHECK(c, cudaMemcpyAsync(c->plan_dev, c->plan_host, total, cudaMemcpyHostToDevice,
                                    c->stream)) ||
      CUDA_CHECK(c, cudaEventRecord(c->plan_copied, c->stream)))
    return cuda_report(c, err);

  char *d = (char *)c->plan_dev;
  c->n_tokens = nt;
  c->n_seqs = ns;
  c->max_blocks = mb;
  c->max_ctx = max_ctx;
  c->block_size = bs;
  c->n_logits = nl;
  c->host_logits_rows = b->logits_rows;
  c->d_tokens = (int32_t *)(d + off_tokens);
  c->d_pos = (int32_t *)(d + off_pos);
  c->d_seq_start = (int32_t *)(d + off_ss);
  c->d_ctx_len = (int32_t *)(d + off_ctx);
  c->d_block_table = (int32_t *)(d + off_bt);
  c->d_logits_rows = (int32_t *)(d + off_lr);
  c->d_slot = (int64_t *)(d + off_slot);
  for (int q = 0; q < CUDA_ATTN_TQ_COUNT; q++) {
    c->d_tiles[q] = (int32_t *)(d + off_tiles[q]);
    c->n_tiles[q] = n_tiles[q];
  }
  cuda_graph_step(c, graph_step, kv);
  if (c->stats && graph_step) {
    c->step_t0 = host_ms();
    c->step_timed = cudaEventRecord(c->ev_step, c->stream) == cudaSuccess;
  }
  return cuda_report(c, err);
}

/* ---- lifecycle ---- */

/* Positional (C++ has no designated initializers before C++20): the slot types differ enough
 * that a misplaced entry fails to compile. */
static const backend_ops g_cuda_ops = {
    "cuda",
    cuda_alloc,
    cuda_free,
    cuda_upload,
    cuda_download,
    cuda_weight_prepare,
    cuda_weight_release,
    cuda_step_begin,
    cuda_op_embed,
    cuda_op_rmsnorm,
    cuda_op_add_rmsnorm,
    cuda_op_matmul,
    cuda_op_rope,
    cuda_op_kv_write,
    cuda_op_attention,
    cuda_op_silu_mul,
    cuda_op_gather_rows,
    cuda_sync,
    cuda_op_sample,
    cuda_kv_dtype,
    cuda_op_norm_matmul,
    cuda_op_norm_gate_up,
    cuda_op_matmul_add,
    cuda_op_qk_rope_kv,
};

static void cuda_ctx_free(cuda_ctx *c) {
  if (!c) return;
  if (c->gmode == CUDA_GRAPH_CAPTURE) {
    cudaGraph_t g = NULL;
    if (cudaStreamEndCapture(c->stream, &g) == cudaSuccess && g) cudaGraphDestroy(g);
  }
  cuda_graph_clear(c);
  if (c->stream) cudaStreamSynchronize(c->stream);
  if (c->stats && c->n_steps)
    fprintf(stderr,
            "cuda stats: %ld decode steps, %ld graphs captured, %ld replays; step start to "
            "logits ready: %.4f ms GPU clock, %.4f ms host clock (mean)\n",
            c->n_steps, c->n_captures, c->n_replays, c->gpu_ms / c->n_steps,
            c->wall_ms / c->n_steps);
  static const char *names[CUDA_OP_COUNT] = {"", "embed", "rmsnorm", "add_rmsnorm", "matmul",
                                             "rope", "kv_write", "attention", "silu_mul",
                                             "gather_rows", "matmul lm_head", "sample",
                                             "norm_matmul", "norm_gate_up", "matmul_add",
                                             "qk_rope_kv", "all_reduce"};
  for (int i = 1; i < CUDA_OP_COUNT && c->stats == 2; i++)
    if (c->prof_n[i])
      fprintf(stderr, "cuda prof: %-14s %8ld calls %10.3f ms total %8.4f ms each\n", names[i],
              c->prof_n[i], c->prof_ms[i], c->prof_ms[i] / c->prof_n[i]);
  if (c->ev_step) cudaEventDestroy(c->ev_step);
  if (c->ev_ready) cudaEventDestroy(c->ev_ready);
  if (c->cublas) cublasDestroy(c->cublas);
  cudaFree(c->cublas_ws);
  cudaFree(c->conv);
  cudaFree(c->attn_ws);
  cudaFree(c->attn_cnt);
  cudaFree(c->rows_dev);
  cudaFree(c->samp_dev);
  cudaFree(c->fuse_ws);
  if (c->samp_host) cudaFreeHost(c->samp_host);
  cudaFree(c->plan_dev);
  if (c->plan_host) cudaFreeHost(c->plan_host);
  if (c->plan_copied) cudaEventDestroy(c->plan_copied);
  if (c->stream) cudaStreamDestroy(c->stream);
  free(c);
}

static void cuda_backend_destroy(backend *b) {
  if (!b) return;
  cuda_ctx_free((cuda_ctx *)b->ctx);
  free(b);
}

extern "C" int backend_cuda_create(backend **out, int device_index, ts_err *err) {
  *out = NULL;
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return ts_errorf(err, TS_EUNSUPPORTED, "no CUDA device: %s", cudaGetErrorString(e));
  }
  if (count == 0) return ts_errorf(err, TS_EUNSUPPORTED, "no CUDA device: none found");
  if (device_index < 0 || device_index >= count)
    return ts_errorf(err, TS_EINVAL, "no CUDA device: index %d, but %d device(s) visible",
                     device_index, count);
  if ((e = cudaSetDevice(device_index)) != cudaSuccess)
    return ts_errorf(err, TS_EUNSUPPORTED, "no CUDA device: cannot use device %d: %s",
                     device_index, cudaGetErrorString(e));

  cuda_ctx *c = (cuda_ctx *)calloc(1, sizeof *c);
  backend *b = (backend *)calloc(1, sizeof *b);
  if (!c || !b) {
    free(c);
    free(b);
    return ts_errorf(err, TS_ENOMEM, "CUDA backend: out of host memory");
  }
  c->device = device_index;
  cudaDeviceProp prop;
  int rc = 0;
  if (CUDA_CHECK(c, cudaGetDeviceProperties(&prop, device_index)) ||
      CUDA_CHECK(c, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) ||
      CUDA_CHECK(c, cudaEventCreateWithFlags(&c->plan_copied, cudaEventDisableTiming)) ||
      CUBLAS_CHECK(c, cublasCreate(&c->cublas)) ||
      CUBLAS_CHECK(c, cublasSetStream(c->cublas, c->stream)) ||
      CUDA_CHECK(c, cudaMalloc(&c->cublas_ws, CUDA_CUBLAS_WS_BYTES)) ||
      CUBLAS_CHECK(c, cublasSetWorkspace(c->cublas, c->cublas_ws, CUDA_CUBLAS_WS_BYTES)) ||
      CUBLAS_CHECK(c, cublasSetMathMode(c->cublas, CUBLAS_DEFAULT_MATH))) {
    rc = ts_errorf(err, c->err_code, "CUDA backend: %s", c->err_msg);
    cuda_ctx_free(c);
    free(b);
    return rc;
  }
  c->cublas_ws_bytes = CUDA_CUBLAS_WS_BYTES;
  c->sm_count = prop.multiProcessorCount;
  const char *ge = getenv("TESSERA_CUDA_GRAPHS");
  c->graphs_enabled = !(ge && !strcmp(ge, "0"));
  const char *pe = getenv("TESSERA_CUDA_PDL");
  c->pdl = !(pe && !strcmp(pe, "0"));
  const char *st = getenv("TESSERA_CUDA_STATS");
  c->stats = st ? atoi(st) : 0;
  if (c->stats == 2) c->graphs_enabled = 0; /* per-op timing needs eager launches */
  if (c->stats && (cudaEventCreate(&c->ev_step) != cudaSuccess ||
                   cudaEventCreate(&c->ev_ready) != cudaSuccess))
    c->stats = 0;
  /* Record so that the first step_begin's wait on it returns at once. */
  cudaEventRecord(c->plan_copied, c->stream);

  /* TESSERA_CUDA_FUSED=0: the plain ops only (forward.c composes them), for comparison. */
  static backend_ops plain_ops;
  const char *fe = getenv("TESSERA_CUDA_FUSED");
  if (fe && !strcmp(fe, "0")) {
    plain_ops = g_cuda_ops;
    plain_ops.norm_matmul = NULL;
    plain_ops.norm_gate_up = NULL;
    plain_ops.matmul_add = NULL;
    plain_ops.qk_rope_kv = NULL;
    b->ops = &plain_ops;
  } else {
    b->ops = &g_cuda_ops;
  }
  b->ctx = c;
  b->destroy = cuda_backend_destroy;
  *out = b;
  return 0;
}
