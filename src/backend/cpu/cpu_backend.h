/* The CPU backend's shared state and the kernel entry points of its op families (matmul.c,
 * attention.c, norm_rope.c, cpu_backend.c). Activations are plain host float32 arrays; weights
 * stay views into the mapped files in their own dtype and are widened one row at a time, except
 * Q8_0/Q4_0 weights on VNNI CPUs, repacked at load into 16-row groups (quant.c). */
#ifndef TESSERA_CPU_BACKEND_H
#define TESSERA_CPU_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "util/threadpool.h"

/* Kernel levels, chosen at run time from what the CPU reports; each level also uses the ones
 * below it. On aarch64 the one SIMD level is NEON. */
enum {
  CPU_ISA_SCALAR = 0, /* portable C, also what the tests compare against */
  CPU_ISA_AVX2 = 1,   /* x86-64 AVX2 + FMA + F16C; aarch64: NEON */
  CPU_ISA_AVX512 = 2, /* AVX-512 F/BW/VL/DQ */
  CPU_ISA_VNNI = 3,   /* AVX-512 VNNI (int8 dot products of the quantized kernels) */
};

/* Whether BF16 weights use AMX by default where the CPU has it (env TESSERA_CPU_AMX=0/1
 * overrides). */
#define CPU_AMX_DEFAULT 1

typedef struct {
  threadpool *pool;
  int n_threads;
  int simd;     /* kernel level in use: CPU_ISA_SCALAR .. isa_max */
  int isa_max;  /* best level this CPU supports */
  int has_bf16; /* AVX512-BF16 (vdpbf16ps) */
  int bf16_act; /* opt-in: BF16 weights multiply activations rounded to BF16 (llama.cpp's way) */
  int has_amx;  /* AMX-TILE + AMX-BF16 usable (CPUID, OS tile state, kernel permission) */
  int amx;      /* AMX on: BF16 weights for every n (amx.c), repacked Q8_0 from 16 tokens */

  /* The staged step (step_begin). */
  int n_tokens;
  int32_t *tokens;   /* [n_tokens] */
  int32_t *pos;      /* [n_tokens] */
  int32_t *tok_seq;  /* [n_tokens] sequence index of each token */
  int64_t *slot;     /* [n_tokens] physical KV row: block * block_size + pos % block_size */
  int n_seqs;
  int max_blocks;
  int32_t *block_table; /* [n_seqs][max_blocks] */
  int max_ctx;          /* longest context of the step */
  size_t cap_tokens, cap_table;

  /* RoPE cos/sin of the staged positions, [n_tokens][hd/2] each, valid while rope_key matches. */
  float *rope_cos, *rope_sin;
  size_t cap_rope;
  int rope_valid;
  int rope_hd;
  rope_params rope_key;

  /* Per-thread scratch: [n_threads][scratch_per_thread] floats (matmul row widening, attention
   * scores). Grown on demand from the calling thread before a parallel op. */
  float *scratch;
  size_t scratch_per_thread;

  /* Activations quantized for the Q8_0/Q4_0 kernels, shared by the threads of one matmul. */
  void *act;
  size_t cap_act;
  /* Q8_0/Q4_0 weights repacked at load for the VNNI kernels (quant.c). */
  struct cpu_qpack *qpack;

  /* Activations packed for the AMX kernel: [n/16][k/2][16][2] bf16. */
  uint16_t *amx_x;
  size_t cap_amx_x;
} cpu_ctx;

/* Creates the CPU backend with `threads` threads (0 = all cores). */
int backend_cpu_create(backend **out, int threads, ts_err *err);
/* Tests: force the portable kernels (on = 1) or re-enable SIMD when the CPU has it (on = 0). */
void cpu_backend_force_scalar(backend *b, int on);
/* Opt-in: BF16 weights multiply activations rounded to BF16 with AVX512-BF16 dot products, as
 * llama.cpp does (about twice the arithmetic rate; activations keep ~3 significant digits).
 * Returns 1 when the CPU can (and the mode is now on), 0 otherwise (mode stays off). */
int cpu_backend_set_bf16_act(backend *b, int on);
/* Tests: use kernel level min(level, what the CPU has); returns the level in use. */
int cpu_backend_set_isa(backend *b, int level);
/* AMX for BF16 weights (activations rounded to BF16, float32 sums): on = 1 when the CPU has it,
 * 0 off. Used only at kernel level CPU_ISA_AVX512 and up. Returns whether it is now on. */
int cpu_backend_set_amx(backend *b, int on);

/* Makes sure every thread has at least n floats of scratch; returns 0 or TS_ENOMEM. */
int cpu_scratch_reserve(cpu_ctx *c, size_t n);
/* Makes room for n floats in each of rope_cos and rope_sin. */
int cpu_rope_reserve(cpu_ctx *c, size_t n);
static inline float *cpu_scratch(cpu_ctx *c, int thread) {
  return c->scratch + (size_t)thread * c->scratch_per_thread;
}

/* Widens n elements of one weight row (n a multiple of the dtype's block) to float32. */
void cpu_row_to_f32(const cpu_ctx *c, ts_dtype dt, const void *src, int64_t n, float *dst);
/* Address of row r of a 2-D weight (honours row_stride). */
static inline const void *cpu_weight_row(const ts_tensor *w, int64_t r) {
  int64_t stride = w->row_stride ? w->row_stride : w->shape[w->ndim - 1];
  return (const char *)w->data + ts_dtype_bytes(w->dtype, stride) * (size_t)r;
}
/* Dot product of two float32 vectors. */
float cpu_dot(const cpu_ctx *c, const float *a, const float *b, int64_t n);
/* Whether the CPU kernels can read a weight of this dtype. */
int cpu_dtype_supported(ts_dtype dt);

/* One matmul y = x @ w^T (+ bias) as the row-range kernels see it. */
typedef struct {
  cpu_ctx *c;
  const float *x; /* [n][k] */
  const ts_tensor *w;
  const ts_tensor *bias;
  int64_t n, k, m;
  float *y; /* [n][m] */
  int bf16_x; /* x was rounded to bf16 into c->act ([n][k] uint16) */
  int widen;  /* 16-bit weights widened to float32 a row block at a time into thread scratch */
} cpu_mm_args;

/* AVX-512 kernels for F32/F16/BF16 weights (matmul_avx512.c): rows [r0, r1) of y, on pool
 * thread `thread` (whose scratch it may use). */
int cpu_matmul_avx512_supports(ts_dtype dt);
void cpu_matmul_avx512_rows(const cpu_mm_args *a, int64_t r0, int64_t r1, int thread);
/* The whole matmul on the AVX-512 kernels; returns 0 (nothing done) when the level or the
 * dtype does not allow it. */
int cpu_matmul_avx512(cpu_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias,
                      int n, float *y);

/* AMX-BF16 (amx.c): whether this CPU and OS let the process use it (asks the kernel once), and
 * the whole matmul for a BF16 weight; returns 0 (nothing done) when AMX is off or not usable. */
int cpu_amx_available(void);
int cpu_matmul_amx(cpu_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
                   float *y);

/* aarch64 NEON kernels for F32/F16/BF16 weights (matmul_neon.c); 0 when not handled. */
int cpu_matmul_neon(cpu_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
                    float *y);

/* Q8_0/Q4_0 weights with activations quantized on the fly (quant.c). */
int cpu_quant_supported(ts_dtype dt);
/* One row of k (a multiple of 32) activations to int8 blocks: d[b] = max|x| / 127 over block b,
 * q = x / d rounded to nearest even.   x, q [k]; d [k/32] */
void cpu_quantize_act(const float *x, int64_t k, int8_t *q, float *d);
/* The whole matmul for a Q8_0/Q4_0 weight; returns 0 (nothing done) for other dtypes. */
int cpu_matmul_quant(cpu_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias,
                     int n, float *y);
/* Where the CPU has AVX-512 VNNI (and TESSERA_CPU_QREPACK is not 0), rewrites a Q8_0/Q4_0 weight
 * into 16-row interleaved groups of the same size class (quant.c describes the layout): t->data
 * then points to a buffer the backend owns until cpu_quant_release puts the view back. 0 or an
 * error; a weight it does not repack is left as it was. */
int cpu_quant_prepare(cpu_ctx *c, ts_tensor *t, ts_err *err);
void cpu_quant_release(cpu_ctx *c, ts_tensor *t);
void cpu_quant_free(cpu_ctx *c); /* every repacked buffer still held */
/* Whether repacked Q8_0 products of 16 tokens or more use AMX-INT8 (AMX on and the CPU has it);
 * the outputs are the VNNI kernels' bits either way. */
int cpu_quant_amx(const cpu_ctx *c);
/* Row r of a repacked weight as the file's blocks (row bytes) or as n float32 (the values
 * cpu_row_to_f32 gives for the file's row); both return 0, doing nothing, when t is not
 * repacked. */
int cpu_quant_packed_row(const cpu_ctx *c, const ts_tensor *t, int64_t r, void *blocks);
int cpu_quant_packed_row_f32(const cpu_ctx *c, const ts_tensor *t, int64_t r, int64_t n,
                             float *dst);

/* e^x for n floats (attention.c's softmax; AVX-512 where the CPU has it, within 2 ulp for
 * x <= 0, exact at 0 and -inf). */
void cpu_exp_f32(const float *x, float *y, int n);

/* Op entry points (the backend_ops slots). */
void cpu_matmul(void *ctx, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
                float *y);
void cpu_rmsnorm(void *ctx, const float *x, const ts_tensor *w, float eps, int rows, int dim,
                 float *out);
void cpu_add_rmsnorm(void *ctx, float *residual, const float *x, const ts_tensor *w, float eps,
                     int rows, int dim, float *out);
void cpu_rope(void *ctx, float *x, int heads, int hd, const rope_params *rp);
void cpu_attention(void *ctx, const kv_cache *kv, int layer, const float *q, int n_head_l,
                   float scale, float *out);

#endif
