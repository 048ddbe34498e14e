/* Shared state of the CUDA backend (context, staged step plan, scratch buffers), the sticky
 * error that the void ops record and step_begin/sync report, and device-side dtype helpers. */
#ifndef TESSERA_CUDA_COMMON_CUH
#define TESSERA_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "backend/backend.h"
#include "util/status.h"
#include "util/tensor.h"
}

/* Attention tiles: a block owns up to CUDA_ATTN_ROWS (token, head) query rows of one sequence
 * and one KV head; token tiles of 1..16 tokens are staged for each power of two. */
#define CUDA_ATTN_ROWS 16
#define CUDA_ATTN_TQ_COUNT 5 /* tile sizes 1, 2, 4, 8, 16 tokens */

#define CUDA_PROF_TAGS 32 /* room for every CUDA_OP_ tag (graph.cuh checks) */

/* What fixes every launch of a decode step (see graph.cu). */
typedef struct {
  int n_tokens, n_seqs, max_blocks, n_logits, max_ctx;
  const void *plan;                  /* staged plan buffer */
  void *const *kv_k;                 /* the KV cache's layer table and its first layer */
  const void *kv_k0;
  const void *first_w, *first_out;   /* the step's first op (the embedding) */
} cuda_graph_key;

typedef struct {
  cuda_graph_key key;
  cudaGraphExec_t exec; /* NULL until captured (the second time the key is seen) */
  uint64_t hash;        /* of the captured op sequence */
  int n_ops;
} cuda_graph_entry;

#define CUDA_MAX_GRAPHS 96
enum { CUDA_GRAPH_OFF, CUDA_GRAPH_PENDING, CUDA_GRAPH_CAPTURE, CUDA_GRAPH_REPLAY };

typedef struct cuda_ctx {
  int device;
  int sm_count;
  int weights_16bit; /* a BF16/F16 matrix was prepared: the KV cache is BF16 */
  int pdl;           /* launch decode kernels with programmatic dependent launch */
  cudaStream_t stream;
  cublasHandle_t cublas;
  void *cublas_ws; /* fixed cuBLAS workspace, so a later graph capture allocates nothing */
  size_t cublas_ws_bytes;

  /* First failure of a void op; reported by step_begin and sync until the context is freed,
   * since a failed launch can leave the device context unusable. */
  int err_code;
  char err_msg[512];

  /* The staged step plan: one pinned host buffer copied by one async copy into plan_dev. */
  void *plan_host;
  void *plan_dev;
  size_t plan_cap;
  cudaEvent_t plan_copied; /* the host buffer may be rewritten once this has fired */
  int n_tokens, n_seqs, max_blocks, max_ctx, block_size, n_logits;
  const int32_t *host_logits_rows; /* the batch's own pointer, to recognise it in gather_rows */
  int32_t *d_tokens;      /* [n_tokens] */
  int32_t *d_pos;         /* [n_tokens] */
  int32_t *d_seq_start;   /* [n_seqs+1] */
  int32_t *d_ctx_len;     /* [n_seqs] */
  int32_t *d_block_table; /* [n_seqs][max_blocks] */
  int32_t *d_logits_rows; /* [n_logits] */
  int64_t *d_slot;        /* [n_tokens] physical KV row: block * block_size + pos % block_size */
  int32_t *d_tiles[CUDA_ATTN_TQ_COUNT]; /* [n_tiles][2] (seq, first token) per tile size */
  int n_tiles[CUDA_ATTN_TQ_COUNT];

  /* Scratch, grown on demand (growth frees the old buffer, which waits for the device). */
  void *conv;      /* matmul activations narrowed to the weight's 16-bit type */
  size_t conv_cap;
  float *attn_ws;  /* split-KV partial results */
  size_t attn_ws_cap;
  unsigned *attn_cnt; /* split decode attention: splits finished per (sequence, KV head) */
  size_t attn_cnt_cap;
  int32_t *rows_dev; /* gather_rows indices that arrived in host memory */
  size_t rows_cap;
  void *fuse_ws;     /* fused ops' fallback: normed input (and up) of a step too big to fuse */
  size_t fuse_ws_cap;
  void *samp_host;   /* pinned: sampling rows and penalty lists in, token ids out */
  size_t samp_host_cap;
  void *samp_dev;
  size_t samp_dev_cap;

  /* Decode-step graphs (graph.cu); TESSERA_CUDA_GRAPHS=0 turns them off. */
  int graphs_enabled;
  int gmode;          /* CUDA_GRAPH_* of the current step */
  cuda_graph_key gkey;
  int gcur;           /* entry being captured or replayed */
  uint64_t ghash;
  int gops;
  int n_graphs;
  cuda_graph_entry graphs[CUDA_MAX_GRAPHS];

  /* TESSERA_CUDA_STATS=1: per-step timings and graph use, printed when the backend is freed. */
  int stats;
  cudaEvent_t ev_step, ev_ready;
  int step_timed;       /* ev_step was recorded for the current step */
  double step_t0;       /* host clock at step_begin */
  long n_steps, n_captures, n_replays;
  double gpu_ms, wall_ms;
  /* TESSERA_CUDA_STATS=2 (eager only): host time per op family (graph.cuh's tags), each op
   * synchronised. */
  int prof_tag;
  double prof_t, prof_ms[CUDA_PROF_TAGS];
  long prof_n[CUDA_PROF_TAGS];
} cuda_ctx;

/* Records the first failure (printf-style) in the context. */
void cuda_fail(cuda_ctx *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Records e (if not cudaSuccess) with the call's text, file and line; returns 0 on success. */
int cuda_check_at(cuda_ctx *c, cudaError_t e, const char *what, const char *file, int line);
int cublas_check_at(cuda_ctx *c, cublasStatus_t s, const char *what, const char *file, int line);
#define CUDA_CHECK(c, call) cuda_check_at((c), (call), #call, __FILE__, __LINE__)
#define CUBLAS_CHECK(c, call) cublas_check_at((c), (call), #call, __FILE__, __LINE__)
/* After a kernel launch: records a launch-configuration error. */
#define CUDA_CHECK_LAUNCH(c, name) cuda_check_at((c), cudaGetLastError(), name, __FILE__, __LINE__)

/* TESSERA_CUDA_STATS: the step's result is about to be produced (records the ready event) /
 * has reached the host (charges the step's GPU and host time). No-ops unless a step is timed. */
void cuda_stats_ready(cuda_ctx *c);
void cuda_stats_done(cuda_ctx *c);

/* Grows a device scratch buffer to at least `bytes`; returns 0 or records the failure. */
int cuda_scratch_reserve(cuda_ctx *c, void **buf, size_t *cap, size_t bytes);

/* Elements between rows of a 2-D weight (row_stride 0 means packed). */
static inline int64_t cuda_weight_stride(const ts_tensor *w) {
  return w->row_stride ? w->row_stride : w->shape[w->ndim - 1];
}

/* Float-like element types the kernels read: weights, KV cache. */
__device__ __forceinline__ float cuda_ld(const float *p) { return *p; }
__device__ __forceinline__ float cuda_ld(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ float cuda_ld(const __half *p) { return __half2float(*p); }
__device__ __forceinline__ void cuda_st(float *p, float v) { *p = v; }
__device__ __forceinline__ void cuda_st(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void cuda_st(__half *p, float v) { *p = __float2half_rn(v); }

/* Runs BODY with T bound to the device type of dtype dt (F32, BF16, F16); else records an error. */
#define CUDA_DISPATCH_FLOAT(c, dt, what, T, ...)                                    \
  do {                                                                              \
    switch (dt) {                                                                   \
      case TS_F32: { typedef float T; __VA_ARGS__; } break;                         \
      case TS_BF16: { typedef __nv_bfloat16 T; __VA_ARGS__; } break;                \
      case TS_F16: { typedef __half T; __VA_ARGS__; } break;                        \
      default:                                                                      \
        cuda_fail((c), TS_EUNSUPPORTED, "CUDA backend: %s: dtype %s not supported", \
                  (what), ts_dtype_table[(dt)].name);                               \
    }                                                                               \
  } while (0)

/* Programmatic dependent launch (TESSERA_CUDA_PDL=0 turns it off): a kernel launched with
 * cuda_launch_pdl may start while its predecessor in the stream is still running, so its launch
 * and its independent prologue (a product's weight prefetch) overlap the predecessor's tail. It
 * must call cuda_pdl_wait before touching anything an earlier kernel writes; kernels call
 * cuda_pdl_trigger to let their successor launch early. Both are no-ops without the attribute,
 * and every kernel launched this way waits, so completion stays transitive along the stream. */
__device__ __forceinline__ void cuda_pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void cuda_pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;"); }

template <typename... Exp, typename... Act>
static inline cudaError_t cuda_launch_pdl(cuda_ctx *c, void (*kernel)(Exp...), dim3 grid,
                                          dim3 block, size_t smem, Act &&...args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = c->stream;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = at;
  cfg.numAttrs = c->pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Act &&>(args)...);
}

static inline unsigned cuda_blocks(int64_t n, int threads) {
  return (unsigned)((n + threads - 1) / threads);
}

__device__ __forceinline__ float cuda_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float cuda_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

#endif
