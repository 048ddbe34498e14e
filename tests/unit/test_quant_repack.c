/* Q8_0 / Q4_0 weights repacked at load (weight_prepare) into 16-row groups: (1) the layout
 * round-trips (each row unpacks to the file's blocks, and to the same floats cpu_row_to_f32
 * gives), release puts the view back; (2) the matmul at every kernel level against a
 * double-precision sum over the same integer blocks and against dequantize-then-float64 with the
 * unquantized activations; (3) a token's output has the same bits alone and as row t of an
 * n-token product (n = 1..20 and 300+); (4) the embedding op reads a repacked table's rows.
 * Random non-zero data, m not a multiple of 16, k = 32, 96 and random multiples of 32, padded
 * file row strides, with and without bias. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "test_quant_util.h"
#include "test_util.h"

static test_rng rng;

static int rand_int(int lo, int hi) {
  return lo + (int)(test_rng_next(&rng) % (uint64_t)(hi - lo + 1));
}

/* Unpacking every row gives the file's blocks and floats; a repacked copy takes the size of the
 * file's blocks for whole groups of 16 rows. */
static void check_round_trip(backend *be, const qweight *w, int packed) {
  cpu_ctx *c = be->ctx;
  const ts_tensor *t = &w->t;
  int m = (int)t->shape[0], k = (int)t->shape[1];
  size_t rb = ts_dtype_bytes(t->dtype, k);
  uint8_t *row = malloc(rb);
  float *f = malloc(sizeof(float) * k), *g = malloc(sizeof(float) * k);
  int bad_blocks = 0, bad_f = 0;
  for (int r = 0; r < m; r++) {
    int got = cpu_quant_packed_row(c, t, r, row);
    CHECK_MSG(got == packed, "packed_row says %d, weight %s repacked", got, packed ? "" : "not");
    if (!got) break;
    if (memcmp(row, w->buf + w->row_bytes * r, rb) != 0) bad_blocks++;
    CHECK(cpu_quant_packed_row_f32(c, t, r, k, f) == 1);
    cpu_row_to_f32(c, t->dtype, w->buf + w->row_bytes * r, k, g);
    if (memcmp(f, g, sizeof(float) * k) != 0) bad_f++;
  }
  CHECK_MSG(bad_blocks == 0 && bad_f == 0, "%s m=%d k=%d: %d rows unpack to other blocks, %d "
            "to other floats", ts_dtype_table[t->dtype].name, m, k, bad_blocks, bad_f);
  free(row);
  free(f);
  free(g);
}

/* The embedding op reads a repacked table's rows as the file's rows dequantized. */
static void test_embed(backend *be, ts_dtype dt) {
  int vocab = rand_int(17, 70), d = 32 * rand_int(1, 5), n = rand_int(1, 40);
  qweight w = make_qweight(&rng, dt, vocab, d, d, 0, 1);
  ts_err err = {0};
  CHECK(be->ops->weight_prepare(be->ctx, &w.t, &err) == 0);
  kv_cache kv;
  CHECK(kv_cache_create(&kv, be, 1, 4, 16, 1, 2, &err) == 0);
  int32_t tokens[40], pos[40], seq_start[2] = {0, n}, ctx_len[1] = {n}, table[4] = {3, 1, 0, 2};
  for (int t = 0; t < n; t++) {
    tokens[t] = rand_int(0, vocab - 1);
    pos[t] = t;
  }
  ts_batch b = {.n_tokens = n, .tokens = tokens, .pos = pos, .n_seqs = 1,
                .seq_start = seq_start, .ctx_len = ctx_len, .max_blocks = 4,
                .block_table = table};
  CHECK(be->ops->step_begin(be->ctx, &b, &kv, &err) == 0);
  float *out = malloc(sizeof(float) * n * d), *want = malloc(sizeof(float) * d);
  be->ops->embed(be->ctx, &w.t, n, d, out);
  int bad = 0;
  for (int t = 0; t < n; t++) {
    cpu_row_to_f32(be->ctx, dt, w.buf + w.row_bytes * tokens[t], d, want);
    bad += memcmp(out + (size_t)t * d, want, sizeof(float) * d) != 0;
  }
  CHECK_MSG(bad == 0, "%s embedding: %d of %d rows differ from the file's", ts_dtype_table[dt].name,
            bad, n);
  free(out);
  free(want);
  kv_cache_free(&kv, be);
  be->ops->weight_release(be->ctx, &w.t);
  free_qweight(&w);
}

static void test_shape(backend *be, int threads, ts_dtype dt, int m, int k, int n,
                       int with_bias) {
  cpu_ctx *c = be->ctx;
  ts_err err = {0};
  int stride = k + 32 * rand_int(0, 1);
  qweight w = make_qweight(&rng, dt, m, k, stride, 0, 1);
  CHECK(be->ops->weight_prepare(be->ctx, &w.t, &err) == 0);
  int packed = w.t.data != w.buf;
  const char *env = getenv("TESSERA_CPU_QREPACK");
  CHECK_MSG(packed == (c->isa_max >= CPU_ISA_VNNI && !(env && strcmp(env, "0") == 0)),
            "repacked %d at isa %d", packed, c->isa_max);
  check_round_trip(be, &w, packed);

  float *bias = malloc(sizeof(float) * m);
  for (int r = 0; r < m; r++) bias[r] = test_rng_float(&rng);
  ts_tensor bt = {.data = bias, .dtype = TS_F32, .ndim = 1, .shape = {m}};
  const ts_tensor *bp = with_bias ? &bt : NULL;
  float *x = malloc(sizeof(float) * n * k), *y = malloc(sizeof(float) * (size_t)n * m);
  float *y1 = malloc(sizeof(float) * m);
  float xs = ldexpf(1.0f, rand_int(-6, 6));
  for (int i = 0; i < n * k; i++) {
    float v = test_rng_float(&rng);
    x[i] = (v == 0 ? 0.25f : v) * xs;
  }
  int8_t *xq = malloc((size_t)n * k);
  float *xd = malloc(sizeof(float) * n * (k / 32));
  for (int t = 0; t < n; t++) ref_quantize(x + t * k, k, xq + t * k, xd + t * (k / 32));

  int top = cpu_backend_set_isa(be, 99);
  for (int level = 0; level <= top; level++) {
    CHECK(cpu_backend_set_isa(be, level) == level);
    be->ops->matmul(be->ctx, x, &w.t, bp, n, y);
    int fails = 0;
    /* Every token of a small batch, a sample of a large one. */
    for (int t = 0; t < n; t += n > 20 ? rand_int(1, 37) : 1)
      for (int r = 0; r < m; r++) {
        double want = with_bias ? bias[r] : 0, mag = 0, deq = want, bound = 0;
        for (int b = 0; b < k / 32; b++) {
          double dw = w.d[r * (k / 32) + b], dx = xd[t * (k / 32) + b];
          long s = 0;
          for (int j = 0; j < 32; j++) {
            int i = b * 32 + j;
            int wq = w.q[(size_t)r * k + i];
            s += (long)wq * xq[t * k + i];
            mag += fabs(dw * dx * wq * xq[t * k + i]);
            deq += dw * wq * (double)x[t * k + i];
            bound += fabs(dw * wq) * dx * 0.5;
          }
          want += dw * dx * (double)s;
        }
        double got = y[(size_t)t * m + r];
        if (fails < 3 && !(fabs(got - want) <= 1e-5 * (mag + 1) &&
                           fabs(got - deq) <= bound + 1e-5 * (mag + 1))) {
          fails++;
          CHECK_MSG(0, "%s level %d threads %d n=%d m=%d k=%d t=%d r=%d: %.9g vs %.9g "
                    "(dequantized %.9g, bound %g)", ts_dtype_table[dt].name, level, threads, n,
                    m, k, t, r, got, want, deq, bound);
        }
      }
    /* Batch invariance: token t alone gives the bits of row t of the batch. */
    for (int t = 0; t < n; t += n > 20 ? rand_int(1, 61) : 1) {
      be->ops->matmul(be->ctx, x + (size_t)t * k, &w.t, bp, 1, y1);
      CHECK_MSG(memcmp(y1, y + (size_t)t * m, sizeof(float) * m) == 0,
                "%s level %d threads %d n=%d m=%d k=%d: token %d depends on its batch",
                ts_dtype_table[dt].name, level, threads, n, m, k, t);
    }
  }
  cpu_backend_set_isa(be, 99);

  be->ops->weight_release(be->ctx, &w.t);
  CHECK(w.t.data == w.buf && w.t.row_stride == stride);
  free(x);
  free(y);
  free(y1);
  free(xq);
  free(xd);
  free(bias);
  free_qweight(&w);
}

int main(void) {
  rng.s = test_seed(0x51a7e3c2d9b04f61ull);
  ts_err err = {0};
  const ts_dtype dts[] = {TS_Q8_0, TS_Q4_0};
  for (int threads = 1; threads <= 3; threads += 2) {
    backend *be = NULL;
    CHECK(backend_create(&be, "cpu", threads, &err) == 0);
    for (int di = 0; di < 2; di++) {
      /* k = 32 and 96, then random; m odd or any, some below one group. */
      for (int n = 1; n <= 20; n++) {
        int k = n == 1 ? 32 : n == 2 ? 96 : 32 * rand_int(1, 12);
        int m = n % 3 == 0 ? 2 * rand_int(0, 40) + 1 : rand_int(1, 90);
        test_shape(be, threads, dts[di], m, k, n, n % 4 != 1);
      }
      test_shape(be, threads, dts[di], 2 * rand_int(8, 40) + 1, 32 * rand_int(1, 6),
                 rand_int(300, 340), 1);
      test_embed(be, dts[di]);
    }
    /* A weight left in place is not mistaken for a repacked one. */
    qweight w = make_qweight(&rng, TS_Q8_0, 5, 64, 64, 0, 1);
    uint8_t row[68];
    CHECK(cpu_quant_packed_row(be->ctx, &w.t, 0, row) == 0);
    free_qweight(&w);
    backend_destroy(be);
  }
  return test_finish("test_quant_repack");
}
