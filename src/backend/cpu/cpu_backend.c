/* The CPU backend: its vtable, memory (aligned host buffers), step staging (positions, KV slots,
 * block tables, validated against the cache), and the simple row ops (embedding, SiLU-gate,
 * gather, KV write). Heavier op families live in matmul.c, attention.c and norm_rope.c. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_backend.h"
#include "util/log.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

/* ---- memory ---------------------------------------------------------------------------- */

static void *cpu_alloc(void *ctx, size_t bytes) {
  (void)ctx;
  void *p = NULL;
  /* 64-byte alignment: whole cache lines for the vector kernels. */
  if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
  return p;
}

static void cpu_free(void *ctx, void *ptr) {
  (void)ctx;
  free(ptr);
}

static void cpu_copy(void *ctx, void *dst, const void *src, size_t bytes) {
  (void)ctx;
  if (bytes) memmove(dst, src, bytes);
}

static int cpu_weight_prepare(void *ctx, ts_tensor *t, ts_err *err) {
  if (!ts_tensor_present(t)) return 0;
  if (!cpu_dtype_supported(t->dtype))
    return ts_errorf(err, TS_EUNSUPPORTED,
                     "weight dtype %s is not supported by the cpu backend (use F32, F16, BF16, "
                     "Q8_0 or Q4_0)",
                     ts_dtype_table[t->dtype].name);
  int64_t inner = t->shape[t->ndim - 1];
  if (inner % ts_dtype_table[t->dtype].block_elems != 0)
    return ts_errorf(err, TS_EFORMAT, "row of %lld elements is not a whole number of %s blocks",
                     (long long)inner, ts_dtype_table[t->dtype].name);
  return cpu_quant_prepare(ctx, t, err);
}

static void cpu_weight_release(void *ctx, ts_tensor *t) { cpu_quant_release(ctx, t); }

int cpu_scratch_reserve(cpu_ctx *c, size_t n) {
  if (n <= c->scratch_per_thread) return 0;
  n = (n + 15) & ~(size_t)15; /* keep each thread's slice 64-byte aligned */
  float *s = cpu_alloc(c, n * (size_t)c->n_threads * sizeof(float));
  if (!s) return TS_ENOMEM;
  free(c->scratch);
  c->scratch = s;
  c->scratch_per_thread = n;
  return 0;
}

int cpu_rope_reserve(cpu_ctx *c, size_t n) {
  if (n <= c->cap_rope) return 0;
  float *a = realloc(c->rope_cos, n * sizeof(float));
  if (!a) return TS_ENOMEM;
  c->rope_cos = a;
  float *b = realloc(c->rope_sin, n * sizeof(float));
  if (!b) return TS_ENOMEM;
  c->rope_sin = b;
  c->cap_rope = n;
  return 0;
}

/* ---- step staging ---------------------------------------------------------------------- */

static int grow(void **p, size_t *cap, size_t n, size_t elem) {
  if (n <= *cap) return 0;
  void *q = realloc(*p, n * elem);
  if (!q) return TS_ENOMEM;
  *p = q;
  *cap = n;
  return 0;
}

/* The per-token arrays share one capacity. */
static int grow_tokens(cpu_ctx *c, size_t n) {
  if (n <= c->cap_tokens) return 0;
  size_t cap;
  cap = c->cap_tokens;
  if (grow((void **)&c->tokens, &cap, n, sizeof(int32_t)) < 0) return TS_ENOMEM;
  cap = c->cap_tokens;
  if (grow((void **)&c->pos, &cap, n, sizeof(int32_t)) < 0) return TS_ENOMEM;
  cap = c->cap_tokens;
  if (grow((void **)&c->tok_seq, &cap, n, sizeof(int32_t)) < 0) return TS_ENOMEM;
  cap = c->cap_tokens;
  if (grow((void **)&c->slot, &cap, n, sizeof(int64_t)) < 0) return TS_ENOMEM;
  c->cap_tokens = n;
  return 0;
}

static int cpu_step_begin(void *ctx, const ts_batch *b, const kv_cache *kv, ts_err *err) {
  cpu_ctx *c = ctx;
  int nt = b->n_tokens, ns = b->n_seqs;
  c->rope_valid = 0;
  c->n_tokens = 0;
  if (nt < 0 || ns < 0 || (nt > 0 && ns < 1) || b->max_blocks < 0)
    return ts_errorf(err, TS_EINVAL, "bad step plan: %d tokens in %d sequences", nt, ns);
  size_t table_n = (size_t)ns * (size_t)b->max_blocks;
  if (grow_tokens(c, (size_t)nt) < 0 ||
      grow((void **)&c->block_table, &c->cap_table, table_n ? table_n : 1, sizeof(int32_t)) < 0)
    return ts_errorf(err, TS_ENOMEM, "out of memory staging a step of %d tokens", nt);
  if (table_n) memcpy(c->block_table, b->block_table, table_n * sizeof(int32_t));
  c->n_seqs = ns;
  c->max_blocks = b->max_blocks;
  c->max_ctx = 0;
  if (nt == 0) return 0;
  if (b->seq_start[0] != 0 || b->seq_start[ns] != nt)
    return ts_errorf(err, TS_EINVAL, "bad step plan: sequence offsets do not cover %d tokens", nt);
  const int bs = kv->block_size;
  for (int s = 0; s < ns; s++) {
    int t0 = b->seq_start[s], t1 = b->seq_start[s + 1], len = b->ctx_len[s];
    if (t1 < t0)
      return ts_errorf(err, TS_EINVAL, "bad step plan: sequence %d has negative length", s);
    if (len < 0 || (int64_t)len > (int64_t)b->max_blocks * bs)
      return ts_errorf(err, TS_EINVAL,
                       "bad step plan: sequence %d context %d exceeds its %d blocks of %d", s,
                       len, b->max_blocks, bs);
    for (int blk = 0; blk < (len + bs - 1) / bs; blk++) {
      int32_t id = b->block_table[(size_t)s * b->max_blocks + blk];
      if (id < 0 || id >= kv->n_blocks)
        return ts_errorf(err, TS_EINVAL, "bad step plan: sequence %d block %d is %d (cache has %d)",
                         s, blk, id, kv->n_blocks);
    }
    if (len > c->max_ctx) c->max_ctx = len;
    for (int t = t0; t < t1; t++) {
      int p = b->pos[t];
      if (p < 0 || p >= len)
        return ts_errorf(err, TS_EINVAL,
                         "bad step plan: token %d of sequence %d at position %d outside its "
                         "context of %d",
                         t, s, p, len);
      c->tokens[t] = b->tokens[t];
      c->pos[t] = p;
      c->tok_seq[t] = s;
      c->slot[t] = (int64_t)b->block_table[(size_t)s * b->max_blocks + p / bs] * bs + p % bs;
    }
  }
  c->n_tokens = nt;
  return 0;
}

/* ---- row ops --------------------------------------------------------------------------- */

typedef struct {
  cpu_ctx *c;
  const ts_tensor *table;
  int d;
  float *out;
} embed_job;

static void embed_rows(void *arg, int64_t t0, int64_t t1, int thread) {
  (void)thread;
  embed_job *j = arg;
  for (int64_t t = t0; t < t1; t++)
    if (!cpu_quant_packed_row_f32(j->c, j->table, j->c->tokens[t], j->d, j->out + (size_t)t * j->d))
      cpu_row_to_f32(j->c, j->table->dtype, cpu_weight_row(j->table, j->c->tokens[t]), j->d,
                     j->out + (size_t)t * j->d);
}

static void cpu_embed(void *ctx, const ts_tensor *table, int n, int d, float *out) {
  cpu_ctx *c = ctx;
  if (n > c->n_tokens) n = c->n_tokens;
  embed_job j = {c, table, d, out};
  threadpool_parallel_for(c->pool, n, 16, embed_rows, &j);
}

typedef struct {
  const float *gate, *up;
  int64_t d;
  float *out;
} silu_job;

static void silu_rows(void *arg, int64_t r0, int64_t r1, int thread) {
  (void)thread;
  silu_job *j = arg;
  for (int64_t i = r0 * j->d; i < r1 * j->d; i++) {
    float g = j->gate[i];
    j->out[i] = g / (1.0f + expf(-g)) * j->up[i];
  }
}

static void cpu_silu_mul(void *ctx, const float *gate, const float *up, int n, int d, float *out) {
  cpu_ctx *c = ctx;
  silu_job j = {gate, up, d, out};
  threadpool_parallel_for(c->pool, n, 4, silu_rows, &j);
}

static void cpu_gather_rows(void *ctx, const float *x, const int32_t *rows, int n, int d,
                            float *out) {
  (void)ctx;
  for (int i = 0; i < n; i++)
    memmove(out + (size_t)i * d, x + (size_t)rows[i] * d, (size_t)d * sizeof(float));
}

static void cpu_kv_write(void *ctx, const kv_cache *kv, int layer, const float *k,
                         const float *v) {
  cpu_ctx *c = ctx;
  size_t row = (size_t)kv->n_kv_l * kv->head_dim;
  float *K = kv->k[layer], *V = kv->v[layer];
  for (int t = 0; t < c->n_tokens; t++) {
    memcpy(K + (size_t)c->slot[t] * row, k + (size_t)t * row, row * sizeof(float));
    memcpy(V + (size_t)c->slot[t] * row, v + (size_t)t * row, row * sizeof(float));
  }
}

/* ---- lifecycle ------------------------------------------------------------------------- */

static const backend_ops cpu_ops = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .weight_prepare = cpu_weight_prepare,
    .weight_release = cpu_weight_release,
    .step_begin = cpu_step_begin,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .add_rmsnorm = cpu_add_rmsnorm,
    .matmul = cpu_matmul,
    .rope = cpu_rope,
    .kv_write = cpu_kv_write,
    .attention = cpu_attention,
    .silu_mul = cpu_silu_mul,
    .gather_rows = cpu_gather_rows,
    .sync = NULL,
};

static int cpu_has_simd(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  /* clang's __builtin_cpu_supports does not know "f16c": read CPUID leaf 1 (ECX bit 29). */
  unsigned a, b, c, d;
  int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c))
    return CPU_ISA_SCALAR;
  /* __builtin_cpu_supports also checks that the OS saves the zmm state. */
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
    return CPU_ISA_AVX2;
  return __builtin_cpu_supports("avx512vnni") ? CPU_ISA_VNNI : CPU_ISA_AVX512;
#elif defined(__aarch64__)
  return CPU_ISA_AVX2; /* NEON is part of every aarch64 CPU */
#else
  return CPU_ISA_SCALAR;
#endif
}

static const char *isa_name(int level) {
#if defined(__aarch64__)
  return level ? "neon" : "scalar";
#else
  static const char *names[] = {"scalar", "avx2/fma", "avx512", "avx512-vnni"};
  return names[level];
#endif
}

static void cpu_destroy(backend *b) {
  if (!b) return;
  cpu_ctx *c = b->ctx;
  if (c) {
    threadpool_free(c->pool);
    free(c->tokens);
    free(c->pos);
    free(c->tok_seq);
    free(c->slot);
    free(c->block_table);
    free(c->rope_cos);
    free(c->rope_sin);
    free(c->scratch);
    free(c->act);
    cpu_quant_free(c);
    free(c->amx_x);
    free(c);
  }
  free(b);
}

int backend_cpu_create(backend **out, int threads, ts_err *err) {
  *out = NULL;
  backend *b = calloc(1, sizeof *b);
  cpu_ctx *c = calloc(1, sizeof *c);
  if (!b || !c) {
    free(b);
    free(c);
    return ts_errorf(err, TS_ENOMEM, "out of memory creating the cpu backend");
  }
  b->ops = &cpu_ops;
  b->ctx = c;
  b->destroy = cpu_destroy;
  int rc = threadpool_create(&c->pool, threads, err);
  if (rc < 0) {
    cpu_destroy(b);
    return rc;
  }
  c->n_threads = threadpool_size(c->pool);
  c->isa_max = c->simd = cpu_has_simd();
#if defined(__x86_64__)
  c->has_bf16 = c->isa_max >= CPU_ISA_AVX512 && __builtin_cpu_supports("avx512bf16");
#endif
  c->has_amx = c->isa_max >= CPU_ISA_AVX512 && cpu_amx_available();
  const char *amx_env = getenv("TESSERA_CPU_AMX"); /* 0: off, 1: on where the CPU has it */
  c->amx = c->has_amx && (amx_env ? strcmp(amx_env, "0") != 0 : CPU_AMX_DEFAULT);
  LOG_I("cpu backend: %d threads, %s kernels%s", c->n_threads, isa_name(c->simd),
        c->amx ? ", AMX-BF16 for BF16 weights" : "");
  *out = b;
  return 0;
}

void cpu_backend_force_scalar(backend *b, int on) {
  cpu_ctx *c = b->ctx;
  c->simd = on ? CPU_ISA_SCALAR : c->isa_max;
}

int cpu_backend_set_bf16_act(backend *b, int on) {
  cpu_ctx *c = b->ctx;
  c->bf16_act = on && c->has_bf16;
  return c->bf16_act;
}

int cpu_backend_set_amx(backend *b, int on) {
  cpu_ctx *c = b->ctx;
  c->amx = on && c->has_amx;
  return c->amx;
}

int cpu_backend_set_isa(backend *b, int level) {
  cpu_ctx *c = b->ctx;
  c->simd = level < c->isa_max ? (level < 0 ? 0 : level) : c->isa_max;
  return c->simd;
}
