/* The tensor-core prefill attention (attention_prefill.cu) against a float64 reference that sees
 * the operands as the kernel does (Q scaled into base 2 and K/V rounded to bf16), and against the
 * float32 kernel (TESSERA_CUDA_PREFILL_ATTN=0) on the same inputs. Each case is a step of several
 * sequences with random cached context before their new tokens (earlier chunks, prefix-cache
 * hits), odd lengths, decode rows mixed in, GQA 1..8, head_dim 64 and 128, F32/BF16/F16 caches.
 * Seeded from the clock (TESSERA_TEST_SEED replays). Without a GPU it prints "skipped" and passes. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../test_util.h"
#include "backend/backend.h"
#include "backend/cuda/backend_cuda.h"

static backend *g_be;
static const backend_ops *g_ops;
static test_rng g_rng;

static int rand_int(int n) { return (int)(test_rng_next(&g_rng) % (uint64_t)n); }

static float *rand_floats(size_t n, float scale) {
  float *p = malloc(n * sizeof *p);
  for (size_t i = 0; i < n; i++) p[i] = test_rng_float(&g_rng) * scale;
  return p;
}

static float round_to(ts_dtype dt, float v) {
  if (dt == TS_BF16) return ts_bf16_to_f32(ts_f32_to_bf16(v));
  if (dt == TS_F16) return ts_f16_to_f32(ts_f32_to_f16(v));
  return v;
}

static void *encode(ts_dtype dt, const float *v, size_t n) {
  size_t es = dt == TS_F32 ? 4 : 2;
  void *p = malloc(n * es);
  for (size_t i = 0; i < n; i++) {
    if (dt == TS_F32) ((float *)p)[i] = v[i];
    else if (dt == TS_BF16) ((uint16_t *)p)[i] = ts_f32_to_bf16(v[i]);
    else ((uint16_t *)p)[i] = ts_f32_to_f16(v[i]);
  }
  return p;
}

static float *dev_floats(const float *host, size_t n) {
  float *d = g_ops->alloc(g_be->ctx, n * sizeof(float));
  g_ops->upload(g_be->ctx, d, host, n * sizeof(float));
  return d;
}

static void poison(float *d, size_t n) {
  float *h = malloc(n * sizeof *h);
  for (size_t i = 0; i < n; i++) h[i] = NAN;
  g_ops->upload(g_be->ctx, d, h, n * sizeof(float));
  free(h);
}

static float *download(const float *d, size_t n) {
  float *h = malloc(n * sizeof *h);
  g_ops->download(g_be->ctx, h, d, n * sizeof(float));
  return h;
}

typedef struct {
  int n_seqs, n_kv, n_head, hd, block_size;
  ts_dtype dt;
  int new_toks[6], ctx[6];
} pf_case;

/* A step over the case's sequences; each maps its blocks onto a random permutation of the
 * cache. */
typedef struct {
  ts_batch b;
  int32_t *tokens, *pos, *seq_start, *ctx_len, *block_table, *logits_rows;
} plan;

static void plan_make(plan *p, const pf_case *pc, int n_blocks) {
  memset(p, 0, sizeof *p);
  int nt = 0, mb = 1, bs = pc->block_size;
  for (int s = 0; s < pc->n_seqs; s++) {
    nt += pc->new_toks[s];
    int need = (pc->ctx[s] + bs - 1) / bs;
    if (need > mb) mb = need;
  }
  p->tokens = calloc((size_t)nt, 4);
  p->pos = malloc((size_t)nt * 4);
  p->seq_start = malloc((size_t)(pc->n_seqs + 1) * 4);
  p->ctx_len = malloc((size_t)pc->n_seqs * 4);
  p->block_table = malloc((size_t)pc->n_seqs * mb * 4);
  p->logits_rows = malloc((size_t)pc->n_seqs * 4);
  int *perm = malloc((size_t)n_blocks * sizeof *perm);
  for (int i = 0; i < n_blocks; i++) perm[i] = i;
  for (int i = n_blocks - 1; i > 0; i--) {
    int j = rand_int(i + 1), t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  int t = 0, used = 0;
  for (int s = 0; s < pc->n_seqs; s++) {
    p->seq_start[s] = t;
    p->ctx_len[s] = pc->ctx[s];
    for (int i = 0; i < pc->new_toks[s]; i++, t++) p->pos[t] = pc->ctx[s] - pc->new_toks[s] + i;
    p->logits_rows[s] = t - 1;
    for (int j = 0; j < mb; j++)
      p->block_table[(size_t)s * mb + j] = j < (pc->ctx[s] + bs - 1) / bs ? perm[used++] : -1;
  }
  CHECK(used <= n_blocks);
  p->seq_start[pc->n_seqs] = t;
  free(perm);
  p->b.n_tokens = nt;
  p->b.tokens = p->tokens;
  p->b.pos = p->pos;
  p->b.n_seqs = pc->n_seqs;
  p->b.seq_start = p->seq_start;
  p->b.ctx_len = p->ctx_len;
  p->b.max_blocks = mb;
  p->b.block_table = p->block_table;
  p->b.n_logits = pc->n_seqs;
  p->b.logits_rows = p->logits_rows;
}

static void plan_free(plan *p) {
  free(p->tokens);
  free(p->pos);
  free(p->seq_start);
  free(p->ctx_len);
  free(p->block_table);
  free(p->logits_rows);
}

static float bf16r(float v) { return ts_bf16_to_f32(ts_f32_to_bf16(v)); }

/* Attention of every (token, head) row in float64. tc: the operands as the tensor-core kernel
 * sees them (q * scale * log2(e) and K/V rounded to bf16, softmax in base 2). ref [nt][nh][hd] */
static void reference(const pf_case *pc, const plan *p, const float *q, const float *mk,
                      const float *mv, float scale, int tc, double *ref) {
  int hd = pc->hd, row = pc->n_kv * hd, group = pc->n_head / pc->n_kv;
  int max_ctx = 1;
  for (int s = 0; s < pc->n_seqs; s++)
    if (pc->ctx[s] > max_ctx) max_ctx = pc->ctx[s];
  double *sc = malloc((size_t)max_ctx * sizeof *sc);
  double *qr = malloc((size_t)hd * sizeof *qr);
  const float qscale = scale * 1.4426950408889634f;
  for (int s = 0; s < pc->n_seqs; s++)
    for (int t = p->seq_start[s]; t < p->seq_start[s + 1]; t++)
      for (int h = 0; h < pc->n_head; h++) {
        int kvh = h / group, nk = p->pos[t] + 1;
        const float *qf = q + ((size_t)t * pc->n_head + h) * hd;
        for (int d = 0; d < hd; d++) qr[d] = tc ? bf16r(qf[d] * qscale) : qf[d];
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j < nk; j++) {
          size_t slot = (size_t)p->block_table[(size_t)s * p->b.max_blocks + j / pc->block_size] *
                            pc->block_size + j % pc->block_size;
          const float *kr = mk + slot * row + (size_t)kvh * hd;
          double dot = 0;
          for (int d = 0; d < hd; d++) dot += qr[d] * (tc ? bf16r(kr[d]) : kr[d]);
          sc[j] = tc ? dot : dot * scale;
          if (sc[j] > mx) mx = sc[j];
        }
        double *rr = ref + ((size_t)t * pc->n_head + h) * hd;
        for (int d = 0; d < hd; d++) rr[d] = 0;
        for (int j = 0; j < nk; j++) {
          double e = tc ? exp2(sc[j] - mx) : exp(sc[j] - mx);
          sum += e;
          size_t slot = (size_t)p->block_table[(size_t)s * p->b.max_blocks + j / pc->block_size] *
                            pc->block_size + j % pc->block_size;
          const float *vr = mv + slot * row + (size_t)kvh * hd;
          for (int d = 0; d < hd; d++) rr[d] += e * (tc ? bf16r(vr[d]) : vr[d]);
        }
        for (int d = 0; d < hd; d++) rr[d] /= sum;
      }
  free(sc);
  free(qr);
}

/* ‖out − ref‖ / ‖ref‖ over everything, and the largest such ratio of one row; a non-finite
 * output (an unwritten, NaN-poisoned element) is infinitely wrong. */
static void errors(const float *out, const double *ref, size_t rows, int hd, double *all,
                   double *worst_row) {
  double num = 0, den = 0;
  *worst_row = 0;
  for (size_t r = 0; r < rows; r++) {
    double rn = 0, rd = 0;
    for (int d = 0; d < hd; d++) {
      double o = out[r * hd + d], x = ref[r * hd + d];
      if (!isfinite(o)) {
        *all = *worst_row = INFINITY;
        return;
      }
      rn += (o - x) * (o - x);
      rd += x * x;
    }
    num += rn;
    den += rd;
    double e = rd > 0 ? sqrt(rn / rd) : sqrt(rn);
    if (e > *worst_row) *worst_row = e;
  }
  *all = den > 0 ? sqrt(num / den) : sqrt(num);
}

static void run_case(const pf_case *pc, const char *name) {
  const int n_layers = 2, layer = 1, hd = pc->hd, row = pc->n_kv * hd;
  int blocks_needed = 0;
  for (int s = 0; s < pc->n_seqs; s++)
    blocks_needed += (pc->ctx[s] + pc->block_size - 1) / pc->block_size;
  int n_blocks = blocks_needed + 5;
  plan p;
  plan_make(&p, pc, n_blocks);
  int nt = p.b.n_tokens;
  size_t cache_elems = (size_t)n_blocks * pc->block_size * row;
  size_t es = pc->dt == TS_F32 ? 4 : 2;

  /* The cache holds random context (cached chunks) and this step's rows; mirror it rounded. */
  float *mk = rand_floats(cache_elems, 1.0f), *mv = rand_floats(cache_elems, 1.0f);
  for (size_t i = 0; i < cache_elems; i++) {
    mk[i] = round_to(pc->dt, mk[i]);
    mv[i] = round_to(pc->dt, mv[i]);
  }
  kv_cache kv;
  memset(&kv, 0, sizeof kv);
  void *kptr[2], *vptr[2];
  kv.n_layers = n_layers;
  kv.n_blocks = n_blocks;
  kv.block_size = pc->block_size;
  kv.n_kv_l = pc->n_kv;
  kv.head_dim = hd;
  kv.dtype = pc->dt;
  kv.k = kptr;
  kv.v = vptr;
  void *ek = encode(pc->dt, mk, cache_elems), *ev = encode(pc->dt, mv, cache_elems);
  for (int l = 0; l < n_layers; l++) {
    kptr[l] = g_ops->alloc(g_be->ctx, cache_elems * es);
    vptr[l] = g_ops->alloc(g_be->ctx, cache_elems * es);
    g_ops->upload(g_be->ctx, kptr[l], ek, cache_elems * es);
    g_ops->upload(g_be->ctx, vptr[l], ev, cache_elems * es);
  }
  free(ek);
  free(ev);
  ts_err err = {0};
  int rc = g_ops->step_begin(g_be->ctx, &p.b, &kv, &err);
  CHECK_MSG(rc == 0, "%s: step_begin: %s", name, err.msg);

  size_t qn = (size_t)nt * pc->n_head * hd;
  float *q = rand_floats(qn, 3.0f);
  float *dq = dev_floats(q, qn), *dout = g_ops->alloc(g_be->ctx, qn * sizeof(float));
  float scale = 1.0f / sqrtf((float)hd);
  double *ref = malloc(qn * sizeof *ref);
  size_t rows = (size_t)nt * pc->n_head;
  double all, worst;

  /* the tensor-core kernel */
  unsetenv("TESSERA_CUDA_PREFILL_ATTN");
  poison(dout, qn);
  g_ops->attention(g_be->ctx, &kv, layer, dq, pc->n_head, scale, dout);
  float *tc = download(dout, qn);
  reference(pc, &p, q, mk, mv, scale, 1, ref);
  errors(tc, ref, rows, hd, &all, &worst);
  /* What is left is P rounded to bf16 before P V (~2^-9 per weight) and float32 sums. */
  CHECK_MSG(all <= 4e-3 && worst <= 1.5e-2, "%s: tensor cores vs bf16-operand reference: "
            "relative error %.3g (worst row %.3g)", name, all, worst);
  double tc_all = all, tc_worst = worst;

  /* the float32 kernel on the same step: exact, and not the same code path */
  setenv("TESSERA_CUDA_PREFILL_ATTN", "0", 1);
  poison(dout, qn);
  g_ops->attention(g_be->ctx, &kv, layer, dq, pc->n_head, scale, dout);
  float *f32 = download(dout, qn);
  unsetenv("TESSERA_CUDA_PREFILL_ATTN");
  reference(pc, &p, q, mk, mv, scale, 0, ref);
  errors(f32, ref, rows, hd, &all, &worst);
  CHECK_MSG(all <= 2e-5, "%s: float32 kernel vs reference: relative error %.3g", name, all);
  errors(tc, ref, rows, hd, &all, &worst);
  CHECK_MSG(all <= 1e-2 && worst <= 4e-2,
            "%s: tensor cores vs exact reference: relative error %.3g (worst row %.3g)", name,
            all, worst);
  CHECK_MSG(memcmp(tc, f32, qn * sizeof *tc) != 0, "%s: the tensor-core kernel did not run",
            name);
  ts_err serr = {0};
  CHECK_MSG(g_ops->sync(g_be->ctx, &serr) == 0, "%s: %s", name, serr.msg);
  fprintf(stderr, "  %-44s %5d tokens: rel err %.2e (row %.2e) vs bf16 ops, %.2e vs exact\n",
          name, nt, tc_all, tc_worst, all);

  free(tc);
  free(f32);
  free(ref);
  free(q);
  free(mk);
  free(mv);
  g_ops->free(g_be->ctx, dq);
  g_ops->free(g_be->ctx, dout);
  for (int l = 0; l < n_layers; l++) {
    g_ops->free(g_be->ctx, kptr[l]);
    g_ops->free(g_be->ctx, vptr[l]);
  }
  plan_free(&p);
}

/* Random sequences: new tokens 1..max_new (at least one sequence with several), cached context
 * 0..max_cached before them. */
static void random_seqs(pf_case *pc, int n_seqs, int max_new, int max_cached) {
  pc->n_seqs = n_seqs;
  int multi = 0;
  for (int s = 0; s < n_seqs; s++) {
    int nw = rand_int(4) == 0 ? 1 : 1 + rand_int(max_new);
    if (s == n_seqs - 1 && !multi && nw < 2) nw = 2 + rand_int(max_new);
    multi |= nw > 1;
    pc->new_toks[s] = nw;
    pc->ctx[s] = nw + (rand_int(3) == 0 ? 0 : rand_int(max_cached + 1));
  }
}

int main(void) {
  const char *seed_env = getenv("TESSERA_TEST_SEED");
  uint64_t seed = seed_env ? strtoull(seed_env, NULL, 0)
                           : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
  g_rng.s = seed ? seed : 1;
  ts_err err = {0};
  int rc = backend_cuda_create(&g_be, 0, &err);
  if (rc != 0) {
    if (strncmp(err.msg, "no CUDA device", 14) == 0) {
      printf("skipped: no CUDA device (%s)\n", err.msg);
      return 0;
    }
    fprintf(stderr, "backend_cuda_create: %s\n", err.msg);
    return 1;
  }
  g_ops = g_be->ops;
  fprintf(stderr, "test_cuda_prefill: seed %llu (TESSERA_TEST_SEED replays)\n",
          (unsigned long long)seed);

  static const ts_dtype dts[3] = {TS_F32, TS_BF16, TS_F16};
  static const int groups[5] = {2, 4, 1, 8, 3};
  static const char *dt_names[3] = {"f32", "bf16", "f16"};
  char name[96];
  /* every head_dim x group x cache dtype, block size 16 */
  for (int hi = 0; hi < 2; hi++)
    for (int gi = 0; gi < 5; gi++)
      for (int di = 0; di < 3; di++) {
        pf_case pc;
        memset(&pc, 0, sizeof pc);
        pc.hd = hi ? 128 : 64;
        pc.n_kv = 1 + rand_int(2);
        pc.n_head = pc.n_kv * groups[gi];
        pc.block_size = 16;
        pc.dt = dts[di];
        random_seqs(&pc, 1 + rand_int(5), 90, 150);
        snprintf(name, sizeof name, "hd%d G%d %s, %d seqs", pc.hd, groups[gi], dt_names[di],
                 pc.n_seqs);
        run_case(&pc, name);
      }
  /* one long prompt after a cached chunk, Qwen3-0.6B's heads; other block sizes */
  {
    pf_case pc = {.n_seqs = 2, .n_kv = 8, .n_head = 16, .hd = 128, .block_size = 16,
                  .dt = TS_BF16};
    pc.new_toks[0] = 300 + rand_int(250);
    pc.ctx[0] = pc.new_toks[0] + rand_int(200);
    pc.new_toks[1] = 1;
    pc.ctx[1] = 1 + rand_int(700);
    run_case(&pc, "long prompt + cached chunk, 16/8 heads, bf16");
    pf_case pb = {.n_kv = 2, .n_head = 8, .hd = 64, .block_size = 32 + 32 * rand_int(2),
                  .dt = TS_F32};
    random_seqs(&pb, 6, 70, 300);
    snprintf(name, sizeof name, "block size %d, 6 seqs, G4 hd64 f32", pb.block_size);
    run_case(&pb, name);
    pf_case pd = {.n_kv = 1, .n_head = 2, .hd = 128, .block_size = 8, .dt = TS_BF16};
    random_seqs(&pd, 3, 40, 40);
    run_case(&pd, "block size 8, G2 hd128 bf16");
  }
  g_be->destroy(g_be);
  return test_finish("test_cuda_prefill");
}
