/* AMX-BF16 matmul for BF16 weights, y = x @ W^T (+ bias), and the detection of AMX (CPUID, the
 * OS's tile state in XCR0, and the per-process permission Linux wants before the first tile
 * instruction). The weights are read in place: a 16-row x 32-element tile is loaded straight
 * from W with W's row stride. The activations are rounded to BF16 (nearest even) and packed once
 * per matmul into the pair layout the tile instruction reads: per block of 16 tokens,
 * [k/2][16][2]. Each thread owns whole 32-row blocks of y; per block it keeps a 2 x 2 grid of
 * 16 x 16 float32 accumulator tiles (two row tiles x two token tiles) and walks k in steps of 32.
 *
 * Every output y[t][r] is one chain of tile dot products over k in the same order, starting from
 * zero, whatever n is or whichever tiles share the block: a token's result does not depend on
 * the batch around it (decode = prefill, bit for bit). */
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_backend.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- detection ------------------------------------------------------------------------- */

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_usable;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

static void amx_detect(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
  if (!(d & (1u << 22)) || !(d & (1u << 24))) return; /* AMX-BF16, AMX-TILE */
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return; /* OSXSAVE: xgetbv works */
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  (void)hi;
  if ((lo & (3u << 17)) != (3u << 17)) return; /* XTILECFG + XTILEDATA saved by the OS */
  /* Linux keeps tile data off until the process asks; a tile load before that faults. */
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return;
  amx_usable = 1;
}

int cpu_amx_available(void) {
  pthread_once(&amx_once, amx_detect);
  return amx_usable;
}

/* ---- activations ----------------------------------------------------------------------- */

#define AMX_TGT \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define TOK 16   /* tokens per B/C tile */
#define KSTEP 32 /* k elements per tile dot product */
#define ROWS 16  /* weight rows per A/C tile */

typedef struct {
  cpu_ctx *c;
  const float *x; /* [n][k] */
  const ts_tensor *w;
  const ts_tensor *bias;
  int64_t n, k, m;
  int64_t kpad;     /* k rounded up to KSTEP */
  uint16_t *xp;     /* [n_tb][kpad/2][TOK][2] bf16: packed activations */
  float *y;         /* [n][m] */
} amx_job;

/* Round to nearest even as ts_f32_to_bf16 does, NaNs kept quiet. */
AMX_TGT static inline __m512i bf16_rne(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r =
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                          _mm512_set1_epi32(0x7f800000));
  __m512i q = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_mask_blend_epi32(nan, r, q);
}

/* Token blocks [b0, b1): each token's row, 32 elements at a time, becomes 16 bf16 pairs that
 * land TOK pairs apart (one scatter per 32 elements). Missing tokens and k past the end are 0. */
AMX_TGT static void pack_blocks(void *arg, int64_t b0, int64_t b1, int thread) {
  (void)thread;
  const amx_job *j = arg;
  const int64_t k = j->k, kpad = j->kpad;
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5,
                                                          4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(TOK));
  for (int64_t tb = b0; tb < b1; tb++) {
    uint32_t *blk = (uint32_t *)(j->xp + (size_t)tb * (size_t)kpad * TOK); /* [kpad/2][TOK] */
    int64_t nt = j->n - tb * TOK < TOK ? j->n - tb * TOK : TOK;
    if (nt < TOK) memset(blk, 0, (size_t)kpad * TOK * sizeof(uint16_t));
    for (int64_t t = 0; t < nt; t++) {
      const float *xr = j->x + (size_t)(tb * TOK + t) * (size_t)k;
      for (int64_t i = 0; i < kpad; i += KSTEP) {
        int64_t left = k - i;
        __mmask16 m0 = left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        __mmask16 m1 = left >= 32 ? 0xffff : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
        __m512i lo = bf16_rne(_mm512_maskz_loadu_ps(m0, xr + i));
        __m512i hi = bf16_rne(_mm512_maskz_loadu_ps(m1, xr + i + 16));
        /* 32 bf16 in k order = 16 pairs (even element in the low half of each dword). */
        __m512i pairs = _mm512_permutex2var_epi16(
            lo,
            _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30,
                             28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0),
            hi);
        _mm512_i32scatter_epi32(blk + (i / 2) * TOK + t, idx, pairs, 4);
      }
    }
  }
}

/* ---- the tile kernel ------------------------------------------------------------------- */

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} amx_cfg;

/* y rows [r0, r0 + nr) of tokens [t0, t0 + nt) from the accumulator tile c ([ROWS][TOK]). */
AMX_TGT static void store_tile(const amx_job *j, const float *c, const float *bias, int64_t r0,
                               int nr, int64_t t0, int nt) {
  if (nr == ROWS && nt == TOK) { /* 16 x 16 transpose in registers */
    __m512 v[16], u[16];
    for (int i = 0; i < 16; i++) v[i] = _mm512_loadu_ps(c + i * TOK);
    for (int i = 0; i < 16; i += 2) {
      u[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
      u[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)
      for (int h = 0; h < 2; h++) {
        __m512d a = _mm512_castps_pd(u[i + h]), b = _mm512_castps_pd(u[i + 2 + h]);
        v[i + h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        v[i + 2 + h] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
      }
    /* v[4g + q] holds, per 128-bit lane L, column 4L + (q order 0,2,1,3) of rows 4g..4g+3. */
    for (int i = 0; i < 16; i += 8)
      for (int h = 0; h < 4; h++) {
        u[i + h] = _mm512_shuffle_f32x4(v[i + h], v[i + 4 + h], 0x88);
        u[i + 4 + h] = _mm512_shuffle_f32x4(v[i + h], v[i + 4 + h], 0xdd);
      }
    for (int h = 0; h < 8; h++) {
      v[h] = _mm512_shuffle_f32x4(u[h], u[h + 8], 0x88);
      v[h + 8] = _mm512_shuffle_f32x4(u[h], u[h + 8], 0xdd);
    }
    /* v[p] now holds one token's 16 rows; which token is fixed by the shuffles above. */
    static const int tok_of[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
    __m512 b = _mm512_loadu_ps(bias);
    for (int p = 0; p < 16; p++)
      _mm512_storeu_ps(j->y + (size_t)(t0 + tok_of[p]) * (size_t)j->m + r0,
                       _mm512_add_ps(v[p], b));
    return;
  }
  for (int t = 0; t < nt; t++) {
    float *yt = j->y + (size_t)(t0 + t) * (size_t)j->m + r0;
    for (int r = 0; r < nr; r++) yt[r] = c[r * TOK + t] + bias[r];
  }
}

/* Rows [r0, r1) of y, r0 a multiple of 2 * ROWS. Thread scratch: [4][ROWS][TOK] float32 staging,
 * then per row tile a [ROWS][KSTEP] bf16 copy of the k tail, then one [ROWS][kpad] bf16 copy for
 * a tile of fewer than ROWS rows (the matrix's last). */
AMX_TGT static void amx_rows(void *arg, int64_t r0, int64_t r1, int thread) {
  const amx_job *j = arg;
  const int64_t k = j->k, kpad = j->kpad, n = j->n;
  const int64_t nsteps = kpad / KSTEP, full = k / KSTEP;
  const ts_tensor *W = j->w;
  const int64_t ws = W->row_stride ? W->row_stride : k; /* elements */
  float *stage = cpu_scratch(j->c, thread);             /* [4][ROWS][TOK] */
  uint16_t *ktail = (uint16_t *)(stage + 4 * ROWS * TOK); /* [2][ROWS][KSTEP] */
  uint16_t *rtail = ktail + 2 * ROWS * KSTEP;             /* [ROWS][kpad] */

  amx_cfg cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int i = 0; i < 8; i++) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  /* Fewer than TOK tokens: the C and B tiles only as wide as the batch (each output element is
   * computed on its own, so the width does not change its bits). */
  if (n < TOK)
    cfg.colsb[0] = cfg.colsb[1] = cfg.colsb[2] = cfg.colsb[3] = cfg.colsb[6] = cfg.colsb[7] =
        (uint16_t)(4 * n);
  /* The stores above are read only by ldtilecfg, whose memory read GCC may not see: keep them. */
  __asm__ volatile("" : : "m"(cfg) : "memory");
  _tile_loadconfig(&cfg);

  for (int64_t rb = r0; rb < r1; rb += 2 * ROWS) {
    /* Per row tile: where its full k steps come from (in place, or the padded copy for a short
     * last tile) and where its tail step comes from. */
    const uint16_t *abase[2], *atail[2];
    int64_t astride[2];
    int nr[2];
    for (int h = 0; h < 2; h++) {
      int64_t rr = rb + h * ROWS;
      nr[h] = rr >= r1 ? 0 : (int)(r1 - rr < ROWS ? r1 - rr : ROWS);
      if (nr[h] == ROWS) {
        abase[h] = cpu_weight_row(W, rr);
        astride[h] = ws * 2;
        atail[h] = ktail + h * ROWS * KSTEP;
        if (full < nsteps) {
          uint16_t *kt = ktail + h * ROWS * KSTEP;
          memset(kt, 0, ROWS * KSTEP * sizeof(uint16_t));
          for (int r = 0; r < ROWS; r++)
            memcpy(kt + r * KSTEP, (const uint16_t *)cpu_weight_row(W, rr + r) + full * KSTEP,
                   (size_t)(k - full * KSTEP) * sizeof(uint16_t));
        }
      } else if (nr[h] > 0) {
        memset(rtail, 0, (size_t)ROWS * (size_t)kpad * sizeof(uint16_t));
        for (int r = 0; r < nr[h]; r++)
          memcpy(rtail + r * kpad, cpu_weight_row(W, rr + r), (size_t)k * sizeof(uint16_t));
        abase[h] = rtail;
        astride[h] = kpad * 2;
        atail[h] = rtail + full * KSTEP;
      }
    }
    const int two_rows = nr[1] > 0;
    float bias[2 * ROWS] = {0};
    if (j->bias && ts_tensor_present(j->bias))
      cpu_row_to_f32(j->c, j->bias->dtype,
                     (const char *)j->bias->data + ts_dtype_bytes(j->bias->dtype, rb),
                     nr[0] + nr[1], bias);

    /* Software prefetch (into L2) of the next row block, one slice of it per k step: the 32
     * row streams of the tiles alone leave the memory system mostly idle at one token (decode
     * b1 121-126 -> 96-104 ms per step with this, against 98-105 for the float32 kernel). The
     * address may lie past the matrix: a prefetch never faults. */
    const uintptr_t nb = (uintptr_t)cpu_weight_row(W, rb) + (uintptr_t)(2 * ROWS * ws * 2);
    const int64_t pf_step = (2 * ROWS * ws * 2 / nsteps + 63) / 64 * 64;
    for (int64_t t0 = 0; t0 < n; t0 += 2 * TOK) {
      const int two_toks = n - t0 > TOK;
      const uint16_t *b0 = j->xp + (size_t)(t0 / TOK) * (size_t)kpad * TOK;
      const uint16_t *b1 = b0 + (size_t)kpad * TOK;
      const int pf = t0 == 0; /* later token blocks find the rows in cache */
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t s = 0; s < nsteps; s++) {
        const uint16_t *a0 = s < full ? abase[0] + s * KSTEP : atail[0];
        const int64_t st0 = s < full ? astride[0] : (abase[0] == rtail ? kpad * 2 : KSTEP * 2);
        if (pf)
          for (int64_t o = 0; o < pf_step; o += 64)
            _mm_prefetch((const char *)(nb + (uintptr_t)(s * pf_step + o)), _MM_HINT_T1);
        _tile_loadd(4, a0, st0);
        _tile_loadd(6, b0 + s * KSTEP * TOK, TOK * 4);
        _tile_dpbf16ps(0, 4, 6);
        if (two_toks) {
          _tile_loadd(7, b1 + s * KSTEP * TOK, TOK * 4);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (two_rows) {
          const uint16_t *a1 = s < full ? abase[1] + s * KSTEP : atail[1];
          const int64_t st1 =
              s < full ? astride[1] : (abase[1] == rtail ? kpad * 2 : KSTEP * 2);
          _tile_loadd(5, a1, st1);
          _tile_dpbf16ps(2, 5, 6);
          if (two_toks) _tile_dpbf16ps(3, 5, 7);
        }
      }
      const int nt0 = (int)(n - t0 < TOK ? n - t0 : TOK);
      const int nt1 = two_toks ? (int)(n - t0 - TOK < TOK ? n - t0 - TOK : TOK) : 0;
      _tile_stored(0, stage, TOK * 4);
      store_tile(j, stage, bias, rb, nr[0], t0, nt0);
      if (two_toks) {
        _tile_stored(1, stage + ROWS * TOK, TOK * 4);
        store_tile(j, stage + ROWS * TOK, bias, rb, nr[0], t0 + TOK, nt1);
      }
      if (two_rows) {
        _tile_stored(2, stage + 2 * ROWS * TOK, TOK * 4);
        store_tile(j, stage + 2 * ROWS * TOK, bias + ROWS, rb + ROWS, nr[1], t0, nt0);
        if (two_toks) {
          _tile_stored(3, stage + 3 * ROWS * TOK, TOK * 4);
          store_tile(j, stage + 3 * ROWS * TOK, bias + ROWS, rb + ROWS, nr[1], t0 + TOK, nt1);
        }
      }
    }
  }
  /* Idle tile state would otherwise be saved and restored on every context switch. */
  _tile_release();
}

int cpu_matmul_amx(cpu_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
                   float *y) {
  if (!c->amx || !c->has_amx || c->simd < CPU_ISA_AVX512 || w->dtype != TS_BF16 || n <= 0)
    return 0;
  amx_job j = {c, x, w, bias, n, w->shape[1], w->shape[0], 0, NULL, y};
  j.kpad = (j.k + KSTEP - 1) / KSTEP * KSTEP;
  const int64_t n_tb = (n + TOK - 1) / TOK;
  size_t need = (size_t)n_tb * (size_t)j.kpad * TOK * sizeof(uint16_t);
  if (need > c->cap_amx_x) {
    void *p = NULL;
    if (posix_memalign(&p, 64, need) != 0) return 0; /* the float32 kernels instead */
    free(c->amx_x);
    c->amx_x = p;
    c->cap_amx_x = need;
  }
  /* staging + k tails (2 x ROWS x KSTEP bf16) + one short row tile (ROWS x kpad bf16) */
  size_t scratch = 4 * ROWS * TOK + ROWS * KSTEP + (size_t)ROWS * (size_t)j.kpad / 2 + 16;
  if (cpu_scratch_reserve(c, scratch) < 0) return 0;
  j.xp = c->amx_x;
  threadpool_parallel_for(c->pool, n_tb, 1, pack_blocks, &j);
  /* Whole 32-row blocks per thread; small matrices stay on one core. */
  threadpool_parallel_for(c->pool, j.m, 2 * ROWS, amx_rows, &j);
  return 1;
}

#else

int cpu_amx_available(void) { return 0; }

int cpu_matmul_amx(cpu_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
                   float *y) {
  (void)c, (void)x, (void)w, (void)bias, (void)n, (void)y;
  return 0;
}

#endif
