/* The wire protocol: random step plans, results, hidden states and control messages survive
 * encode -> decode unchanged; every truncation and random corruption of a frame is rejected
 * cleanly or decodes to a plan that still validates; headers with a bad magic, version, type or
 * length are refused; whole frames move over a socket pair; the handshake accepts the launch's
 * peers and turns away wrong secrets, groups and fingerprints. */
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dist/net.h"
#include "dist/wire.h"
#include "test_util.h"

static size_t rnd(test_rng *r, size_t n) { return n ? (size_t)(test_rng_next(r) % n) : 0; }

typedef struct {
  ts_batch b;
  int32_t *mem;
} owned_batch;

/* A plan that satisfies wire_batch_validate: random sequences of random lengths. */
static void random_batch(test_rng *r, owned_batch *ob) {
  int ns = (int)rnd(r, 9), mb = (int)rnd(r, 6);
  int lens[8], nt = 0;
  for (int s = 0; s < ns; s++) nt += lens[s] = (int)rnd(r, 40) + (rnd(r, 2) ? 1 : 0);
  int nl = nt ? (int)rnd(r, (size_t)nt + 1) : 0;
  size_t words = 2 * (size_t)nt + (size_t)ns + 1 + (size_t)ns + (size_t)ns * (size_t)mb + (size_t)nl;
  int32_t *m = ob->mem = malloc(words * 4 + 4);
  ts_batch *b = &ob->b;
  memset(b, 0, sizeof *b);
  b->n_tokens = nt;
  b->n_seqs = ns;
  b->max_blocks = mb;
  b->n_logits = nl;
  int32_t *tok = m, *pos = m + nt, *ss = pos + nt, *ctx = ss + ns + 1, *bt = ctx + ns,
          *lr = bt + ns * mb;
  ss[0] = 0;
  for (int s = 0; s < ns; s++) {
    ss[s + 1] = ss[s] + lens[s];
    ctx[s] = lens[s] + (int32_t)rnd(r, 5000);
    for (int i = ss[s]; i < ss[s + 1]; i++) {
      tok[i] = (int32_t)rnd(r, 152000);
      pos[i] = ctx[s] - lens[s] + (i - ss[s]);
    }
    for (int k = 0; k < mb; k++) bt[s * mb + k] = (int32_t)rnd(r, 100000) - 1;
  }
  for (int i = 0; i < nl; i++) lr[i] = (int32_t)rnd(r, (size_t)nt);
  b->tokens = tok, b->pos = pos, b->seq_start = ss, b->ctx_len = ctx, b->block_table = bt;
  b->logits_rows = lr;
}

static int same_i32(const int32_t *a, const int32_t *b, size_t n) {
  return n == 0 || memcmp(a, b, n * 4) == 0;
}

static int same_batch(const ts_batch *a, const ts_batch *b) {
  return a->n_tokens == b->n_tokens && a->n_seqs == b->n_seqs && a->max_blocks == b->max_blocks &&
         a->n_logits == b->n_logits && same_i32(a->tokens, b->tokens, (size_t)a->n_tokens) &&
         same_i32(a->pos, b->pos, (size_t)a->n_tokens) &&
         same_i32(a->seq_start, b->seq_start, (size_t)a->n_seqs + 1) &&
         same_i32(a->ctx_len, b->ctx_len, (size_t)a->n_seqs) &&
         same_i32(a->block_table, b->block_table, (size_t)a->n_seqs * (size_t)a->max_blocks) &&
         same_i32(a->logits_rows, b->logits_rows, (size_t)a->n_logits);
}

/* Splits an encoded frame into its checked header and payload. */
static int split(const wire_buf *w, wire_header *h, const uint8_t **payload) {
  ts_err err = {0};
  int rc = wire_header_decode(w->data, w->len, 0, h, &err);
  if (rc == 0 && h->length != w->len - WIRE_HEADER_SIZE) rc = -1;
  *payload = w->data + WIRE_HEADER_SIZE;
  return rc;
}

/* Decodes a payload as the given type (for truncation and corruption runs): status only. */
static int decode_any(int type, const uint8_t *p, size_t n) {
  ts_err err = {0};
  int rc;
  switch (type) {
  case WIRE_MSG_STEP: {
    wire_step s;
    rc = wire_decode_step(p, n, &s, &err);
    if (rc == 0) {
      CHECK(wire_batch_validate(&s.batch, &err) == 0);
      wire_step_free(&s);
    }
    break;
  }
  case WIRE_MSG_RESULT: {
    wire_result r;
    rc = wire_decode_result(p, n, &r, &err);
    if (rc == 0) wire_result_free(&r);
    break;
  }
  case WIRE_MSG_HIDDEN: {
    wire_hidden h;
    rc = wire_decode_hidden(p, n, &h, &err);
    if (rc == 0) wire_hidden_free(&h);
    break;
  }
  case WIRE_MSG_HELLO: {
    wire_hello h;
    rc = wire_decode_hello(p, n, &h, &err);
    break;
  }
  case WIRE_MSG_PEERS: {
    wire_peers pr;
    rc = wire_decode_peers(p, n, &pr, &err);
    if (rc == 0) wire_peers_free(&pr);
    break;
  }
  case WIRE_MSG_INFO: {
    wire_info i;
    rc = wire_decode_info(p, n, &i, &err);
    break;
  }
  case WIRE_MSG_INIT_KV: {
    wire_init_kv k;
    rc = wire_decode_init_kv(p, n, &k, &err);
    break;
  }
  default:
    return -100;
  }
  if (rc < 0) CHECK(err.msg[0] != '\0'); /* every rejection says why */
  return rc;
}

/* Every strict prefix of a payload fails; random byte flips never crash (ASan watches). */
static void mangle(test_rng *r, int type, const uint8_t *payload, size_t n) {
  for (size_t cut = 0; cut < n; cut++) {
    uint8_t *copy = malloc(cut ? cut : 1); /* exact size, so ASan sees any over-read */
    memcpy(copy, payload, cut);
    CHECK_MSG(decode_any(type, copy, cut) < 0, "%s truncated to %zu of %zu decoded",
              wire_msg_name(type), cut, n);
    free(copy);
  }
  uint8_t *copy = malloc(n + 1);
  for (int k = 0; k < 50; k++) {
    memcpy(copy, payload, n);
    int flips = 1 + (int)rnd(r, 4);
    for (int f = 0; f < flips && n; f++) copy[rnd(r, n)] ^= (uint8_t)(1 + rnd(r, 255));
    (void)decode_any(type, copy, n);
  }
  /* One byte too many is trailing garbage. */
  memcpy(copy, payload, n);
  copy[n] = 0;
  CHECK(decode_any(type, copy, n + 1) < 0);
  free(copy);
}

/* Sampling rows for n logits rows with random parameters in range and penalty lists. */
typedef struct {
  ts_sample_row rows[330];
  int32_t ids[330][8], counts[330][8];
} owned_rows;

static float frand(test_rng *r) { return (float)rnd(r, 1u << 20) / (float)(1u << 20); }

static void random_rows(test_rng *r, owned_rows *o, int n) {
  for (int i = 0; i < n; i++) {
    ts_sample_row *s = &o->rows[i];
    *s = (ts_sample_row){.temperature = 2 * frand(r), .top_p = 1 - frand(r) * 0.99f,
                         .min_p = frand(r), .top_k = (int)rnd(r, 100) - 1,
                         .presence_penalty = frand(r) - 0.5f, .frequency_penalty = frand(r),
                         .repetition_penalty = 0.5f + frand(r), .seed = test_rng_next(r),
                         .counter = test_rng_next(r) >> 20, .n_penalty = (int)rnd(r, 9),
                         .penalty_ids = o->ids[i], .penalty_counts = o->counts[i]};
    for (int k = 0; k < s->n_penalty; k++) {
      o->ids[i][k] = (int32_t)rnd(r, 150000);
      o->counts[i][k] = (int32_t)rnd(r, 5);
    }
  }
}

static int same_rows(const ts_sample_row *a, const ts_sample_row *b, int n) {
  for (int i = 0; i < n; i++) {
    const ts_sample_row *x = &a[i], *y = &b[i];
    if (x->temperature != y->temperature || x->top_p != y->top_p || x->min_p != y->min_p ||
        x->top_k != y->top_k || x->presence_penalty != y->presence_penalty ||
        x->frequency_penalty != y->frequency_penalty ||
        x->repetition_penalty != y->repetition_penalty || x->seed != y->seed ||
        x->counter != y->counter || x->n_penalty != y->n_penalty)
      return 0;
    for (int k = 0; k < x->n_penalty; k++)
      if (x->penalty_ids[k] != y->penalty_ids[k] || x->penalty_counts[k] != y->penalty_counts[k])
        return 0;
  }
  return 1;
}

static void test_steps(test_rng *r) {
  static owned_rows orows;
  wire_buf w;
  wire_buf_init(&w);
  int distinct = 0;
  uint64_t prev_id = 0;
  for (int it = 0; it < 200; it++) {
    owned_batch ob;
    random_batch(r, &ob);
    uint64_t id = test_rng_next(r);
    uint32_t flags = (uint32_t)rnd(r, 2);
    if (id != prev_id) distinct++;
    prev_id = id;
    const ts_sample_row *rows = NULL;
    if (flags & WIRE_STEP_SAMPLE) {
      CHECK(ob.b.n_logits <= 330);
      random_rows(r, &orows, ob.b.n_logits);
      rows = orows.rows;
    }
    wire_buf_reset(&w);
    ts_err err = {0};
    CHECK_MSG(wire_encode_step(&w, id, flags, &ob.b, rows, &err) == 0, "%s", err.msg);
    wire_header h;
    const uint8_t *p;
    CHECK(split(&w, &h, &p) == 0 && h.type == WIRE_MSG_STEP);
    wire_step s;
    CHECK_MSG(wire_decode_step(p, h.length, &s, &err) == 0, "%s", err.msg);
    CHECK(s.step_id == id && s.flags == flags && same_batch(&s.batch, &ob.b));
    CHECK(rows ? s.rows && same_rows(s.rows, rows, ob.b.n_logits) : !s.rows);
    wire_step_free(&s);
    if (it < 20) mangle(r, WIRE_MSG_STEP, p, h.length);
    free(ob.mem);
  }
  CHECK(distinct > 190);
  /* Plans that break the invariants are refused by the encoder. */
  owned_batch ob;
  do random_batch(r, &ob);
  while (ob.b.n_logits == 0 && (free(ob.mem), 1));
  ts_err err = {0};
  ((int32_t *)ob.b.logits_rows)[0] = ob.b.n_tokens;
  CHECK(wire_encode_step(&w, 1, 0, &ob.b, NULL, &err) == TS_EPROTO);
  ((int32_t *)ob.b.logits_rows)[0] = 0;
  /* Sampling rows out of range, or missing, are refused too. */
  random_rows(r, &orows, ob.b.n_logits);
  CHECK(wire_encode_step(&w, 1, WIRE_STEP_SAMPLE, &ob.b, orows.rows, &err) == 0);
  CHECK(wire_encode_step(&w, 1, WIRE_STEP_SAMPLE, &ob.b, NULL, &err) == TS_EINVAL);
  orows.rows[0].top_p = 0;
  CHECK(wire_encode_step(&w, 1, WIRE_STEP_SAMPLE, &ob.b, orows.rows, &err) == TS_EPROTO);
  orows.rows[0].top_p = 1;
  orows.rows[0].temperature = NAN;
  CHECK(wire_encode_step(&w, 1, WIRE_STEP_SAMPLE, &ob.b, orows.rows, &err) == TS_EPROTO);
  orows.rows[0].temperature = 0;
  orows.rows[0].n_penalty = 1;
  orows.ids[0][0] = -1;
  CHECK(wire_encode_step(&w, 1, WIRE_STEP_SAMPLE, &ob.b, orows.rows, &err) == TS_EPROTO);
  ((int32_t *)ob.b.seq_start)[ob.b.n_seqs] += 1;
  CHECK(wire_encode_step(&w, 1, 0, &ob.b, NULL, &err) == TS_EPROTO);
  free(ob.mem);
  /* Counts whose byte size wraps around 2^64 onto the payload size: (2^31-1)^2 block-table
   * entries plus the rest come to 2^62 + 3 words, "12 bytes" modulo 2^64. */
  for (int extra = 0; extra < 4; extra++) {
    wire_buf_reset(&w);
    wire_put_u64(&w, test_rng_next(r));
    wire_put_u32(&w, extra < 2 ? 0 : WIRE_STEP_SAMPLE); /* sampled steps take another path */
    wire_put_i32(&w, 0);
    wire_put_i32(&w, INT32_MAX);
    wire_put_i32(&w, INT32_MAX);
    wire_put_i32(&w, 3);
    for (int i = 0; i < 3 + extra % 2; i++) wire_put_i32(&w, (int32_t)rnd(r, 5));
    wire_step s;
    CHECK(wire_decode_step(w.data, w.len, &s, &err) == TS_EPROTO);
  }
  wire_buf_reset(&w);
  wire_put_u64(&w, 1);
  wire_put_i32(&w, WIRE_RESULT_LOGITS);
  wire_put_i32(&w, INT32_MAX);
  wire_put_i32(&w, INT32_MAX);
  wire_put_u8(&w, 0);
  wire_put_i32(&w, 5);
  wire_result res;
  CHECK(wire_decode_result(w.data, w.len, &res, &err) == TS_EPROTO);
  wire_buf_free(&w);
}

static void test_results_hidden(test_rng *r) {
  wire_buf w;
  wire_buf_init(&w);
  ts_err err = {0};
  for (int it = 0; it < 60; it++) {
    wire_buf_reset(&w);
    wire_result res = {.step_id = test_rng_next(r), .kind = (int32_t)rnd(r, 2),
                       .n_rows = (int32_t)rnd(r, 20)};
    res.vocab = res.kind == WIRE_RESULT_LOGITS ? (int32_t)rnd(r, 300) : 0;
    size_t nf = res.kind == WIRE_RESULT_LOGITS ? (size_t)res.n_rows * (size_t)res.vocab
                                               : (size_t)res.n_rows;
    float *fl = malloc(nf * 4 + 4);
    int32_t *ids = malloc((size_t)res.n_rows * 4 + 4);
    for (size_t i = 0; i < nf; i++) fl[i] = test_rng_float(r) * 30.0f;
    for (int i = 0; i < res.n_rows; i++) ids[i] = (int32_t)rnd(r, 150000);
    int with_lp = (int)rnd(r, 2);
    if (res.kind == WIRE_RESULT_TOKENS) {
      res.tokens = ids;
      res.logprobs = with_lp ? fl : NULL;
    } else {
      res.logits = fl;
    }
    CHECK(wire_encode_result(&w, &res, &err) == 0);
    wire_header h;
    const uint8_t *p;
    CHECK(split(&w, &h, &p) == 0 && h.type == WIRE_MSG_RESULT);
    wire_result got;
    CHECK_MSG(wire_decode_result(p, h.length, &got, &err) == 0, "%s", err.msg);
    CHECK(got.step_id == res.step_id && got.kind == res.kind && got.n_rows == res.n_rows);
    if (res.kind == WIRE_RESULT_TOKENS) {
      CHECK(same_i32(got.tokens, ids, (size_t)res.n_rows));
      CHECK((got.logprobs != NULL) == with_lp);
      if (with_lp) CHECK(memcmp(got.logprobs, fl, (size_t)res.n_rows * 4) == 0);
    } else {
      CHECK(got.vocab == res.vocab && (nf == 0 || memcmp(got.logits, fl, nf * 4) == 0));
    }
    wire_result_free(&got);
    if (it < 6) mangle(r, WIRE_MSG_RESULT, p, h.length);
    free(fl);
    free(ids);

    /* Hidden states in each dtype. */
    static const int dtypes[] = {TS_F32, TS_F16, TS_BF16};
    wire_hidden hs = {.step_id = test_rng_next(r), .n_tokens = (int32_t)rnd(r, 9),
                      .dim = (int32_t)rnd(r, 64), .dtype = dtypes[rnd(r, 3)]};
    size_t bytes = (size_t)hs.n_tokens * (size_t)hs.dim * (hs.dtype == TS_F32 ? 4 : 2);
    uint8_t *data = malloc(bytes + 1);
    for (size_t i = 0; i < bytes; i++) data[i] = (uint8_t)test_rng_next(r);
    hs.data = data;
    wire_buf_reset(&w);
    CHECK(wire_encode_hidden(&w, &hs, &err) == 0);
    CHECK(split(&w, &h, &p) == 0 && h.type == WIRE_MSG_HIDDEN);
    wire_hidden hg;
    CHECK_MSG(wire_decode_hidden(p, h.length, &hg, &err) == 0, "%s", err.msg);
    CHECK(hg.step_id == hs.step_id && hg.n_tokens == hs.n_tokens && hg.dim == hs.dim &&
          hg.dtype == hs.dtype && (bytes == 0 || memcmp(hg.data, data, bytes) == 0));
    wire_hidden_free(&hg);
    if (it < 6) mangle(r, WIRE_MSG_HIDDEN, p, h.length);
    free(data);
  }
  wire_buf_free(&w);
}

static void random_hello(test_rng *r, wire_hello *h) {
  memset(h, 0, sizeof *h);
  h->role = (uint8_t)rnd(r, 3);
  h->fingerprint = test_rng_next(r);
  h->group_id = test_rng_next(r);
  for (int i = 0; i < WIRE_SECRET_LEN; i++) h->secret[i] = (uint8_t)test_rng_next(r);
  h->world_size = 1 + (int32_t)rnd(r, 16);
  h->rank = (int32_t)rnd(r, (size_t)h->world_size);
  h->tp_rank = (int32_t)rnd(r, 4), h->tp_size = 4, h->pp_rank = (int32_t)rnd(r, 2), h->pp_size = 2;
  h->port = (int32_t)rnd(r, 65536);
  size_t hl = rnd(r, 40);
  for (size_t i = 0; i < hl; i++) h->host[i] = (char)('a' + rnd(r, 26));
}

static void test_control(test_rng *r) {
  wire_buf w;
  wire_buf_init(&w);
  ts_err err = {0};
  wire_header h;
  const uint8_t *p = NULL;
  for (int it = 0; it < 20; it++) {
    wire_hello a, b;
    random_hello(r, &a);
    wire_buf_reset(&w);
    CHECK(wire_encode_hello(&w, &a, &err) == 0 && split(&w, &h, &p) == 0);
    CHECK(wire_decode_hello(p, h.length, &b, &err) == 0 && memcmp(&a, &b, sizeof a) == 0);
    if (it < 3) mangle(r, WIRE_MSG_HELLO, p, h.length);

    wire_hello_ack ack, ack2;
    memset(&ack, 0, sizeof ack); /* padding too: the structs are compared whole */
    ack.status = -(int32_t)rnd(r, 13);
    ack.hello = a;
    snprintf(ack.reason, sizeof ack.reason, "reason %llu", (unsigned long long)test_rng_next(r));
    wire_buf_reset(&w);
    CHECK(wire_encode_hello_ack(&w, &ack, &err) == 0 && split(&w, &h, &p) == 0);
    CHECK(wire_decode_hello_ack(p, h.length, &ack2, &err) == 0 &&
          memcmp(&ack, &ack2, sizeof ack) == 0);

    wire_peers peers = {.n = (int)rnd(r, 9)}, pg;
    peers.peers = calloc((size_t)peers.n + 1, sizeof *peers.peers);
    for (int i = 0; i < peers.n; i++) {
      snprintf(peers.peers[i].host, sizeof peers.peers[i].host, "10.0.%d.%d", (int)rnd(r, 256),
               (int)rnd(r, 256));
      peers.peers[i].port = (int32_t)rnd(r, 65536);
    }
    wire_buf_reset(&w);
    CHECK(wire_encode_peers(&w, &peers, &err) == 0 && split(&w, &h, &p) == 0);
    CHECK(wire_decode_peers(p, h.length, &pg, &err) == 0 && pg.n == peers.n &&
          (pg.n == 0 || memcmp(pg.peers, peers.peers, (size_t)pg.n * sizeof *pg.peers) == 0));
    if (it < 3) mangle(r, WIRE_MSG_PEERS, p, h.length);
    wire_peers_free(&pg);
    free(peers.peers);

    wire_ping ping = {test_rng_next(r), test_rng_next(r), -(int32_t)rnd(r, 5)}, pong;
    int type = rnd(r, 2) ? WIRE_MSG_PING : WIRE_MSG_PONG;
    wire_buf_reset(&w);
    CHECK(wire_encode_ping(&w, type, &ping, &err) == 0 && split(&w, &h, &p) == 0);
    CHECK(h.type == type && wire_decode_ping(p, h.length, &pong, &err) == 0 &&
          pong.seq == ping.seq && pong.time_ms == ping.time_ms && pong.status == ping.status);

    wire_error e = {.step_id = test_rng_next(r), .code = -(int32_t)rnd(r, 13)}, eg;
    snprintf(e.message, sizeof e.message, "worker %llu failed", (unsigned long long)rnd(r, 99));
    wire_buf_reset(&w);
    CHECK(wire_encode_error(&w, &e, &err) == 0 && split(&w, &h, &p) == 0);
    CHECK(wire_decode_error(p, h.length, &eg, &err) == 0 && eg.step_id == e.step_id &&
          eg.code == e.code && strcmp(eg.message, e.message) == 0);

    wire_info info, ig;
    memset(&info, 0, sizeof info);
    info.vocab_size = 1 + (int32_t)rnd(r, 200000);
    info.max_pos = (int32_t)rnd(r, 1 << 20);
    info.max_tokens = (int32_t)rnd(r, 8192);
    info.kv_bytes_per_token = (int64_t)rnd(r, (size_t)1 << 40);
    info.bos_id = (int32_t)rnd(r, 1000) - 1;
    info.n_eos = (int32_t)rnd(r, WIRE_MAX_EOS + 1);
    for (int i = 0; i < info.n_eos; i++) info.eos_ids[i] = (int32_t)rnd(r, 200000);
    info.can_sample = (int32_t)rnd(r, 2);
    wire_buf_reset(&w);
    CHECK(wire_encode_info(&w, &info, &err) == 0 && split(&w, &h, &p) == 0);
    CHECK(wire_decode_info(p, h.length, &ig, &err) == 0 && memcmp(&ig, &info, sizeof ig) == 0);
    if (it < 3) mangle(r, WIRE_MSG_INFO, p, h.length);
    info.n_eos = WIRE_MAX_EOS + 1;
    CHECK(wire_encode_info(&w, &info, &err) == TS_EPROTO);

    wire_init_kv kv = {.block_size = 1 + (int32_t)rnd(r, 256),
                       .kv_cache_bytes = (int64_t)rnd(r, (size_t)1 << 40),
                       .n_blocks = (int32_t)rnd(r, 100000)},
                 kg;
    wire_buf_reset(&w);
    CHECK(wire_encode_init_kv(&w, &kv, &err) == 0 && split(&w, &h, &p) == 0);
    CHECK(wire_decode_init_kv(p, h.length, &kg, &err) == 0 && kg.block_size == kv.block_size &&
          kg.kv_cache_bytes == kv.kv_cache_bytes && kg.n_blocks == kv.n_blocks);
    if (it < 3) mangle(r, WIRE_MSG_INIT_KV, p, h.length);

    char reason[64];
    wire_buf_reset(&w);
    CHECK(wire_encode_shutdown(&w, e.message, &err) == 0 && split(&w, &h, &p) == 0);
    CHECK(wire_decode_shutdown(p, h.length, reason, sizeof reason, &err) == 0 &&
          strcmp(reason, e.message) == 0);
    CHECK(wire_decode_shutdown(p, h.length, reason, 4, &err) == TS_EPROTO); /* does not fit */
  }
  /* Headers: magic, version, type and length limits. */
  wire_buf_reset(&w);
  wire_ping ping = {1, 2, 0};
  CHECK(wire_encode_ping(&w, WIRE_MSG_PING, &ping, &err) == 0);
  uint8_t hdr[WIRE_HEADER_SIZE];
  memcpy(hdr, w.data, sizeof hdr);
  CHECK(wire_header_decode(hdr, sizeof hdr, 0, &h, &err) == 0 && h.length == 20);
  CHECK(wire_header_decode(hdr, sizeof hdr - 1, 0, &h, &err) == TS_EPROTO);
  CHECK(wire_header_decode(hdr, sizeof hdr, 19, &h, &err) == TS_EPROTO);
  hdr[0] ^= 1;
  CHECK(wire_header_decode(hdr, sizeof hdr, 0, &h, &err) == TS_EPROTO);
  CHECK(strstr(err.msg, "magic") != NULL);
  hdr[0] ^= 1, hdr[4] = WIRE_VERSION + 1;
  CHECK(wire_header_decode(hdr, sizeof hdr, 0, &h, &err) == TS_EPROTO);
  CHECK(strstr(err.msg, "version") != NULL);
  hdr[4] = WIRE_VERSION, hdr[6] = WIRE_MSG_END_;
  CHECK(wire_header_decode(hdr, sizeof hdr, 0, &h, &err) == TS_EPROTO);
  hdr[6] = WIRE_MSG_PING, hdr[11] = 0x80; /* 2 GiB > WIRE_MAX_FRAME */
  CHECK(wire_header_decode(hdr, sizeof hdr, 0, &h, &err) == TS_EPROTO);
  wire_buf_free(&w);

  /* Secrets: hex round trip, constant-time compare, randomness. */
  uint8_t s1[WIRE_SECRET_LEN], s2[WIRE_SECRET_LEN];
  char hex[2 * WIRE_SECRET_LEN + 1];
  CHECK(wire_secret_random(s1, &err) == 0 && wire_secret_random(s2, &err) == 0);
  CHECK(!wire_secret_equal(s1, s2));
  wire_secret_to_hex(s1, hex);
  CHECK(wire_secret_from_hex(hex, s2, &err) == 0 && wire_secret_equal(s1, s2));
  hex[5] = 'x';
  CHECK(wire_secret_from_hex(hex, s2, &err) == TS_EINVAL);
  CHECK(wire_secret_from_hex("abcd", s2, &err) == TS_EINVAL);
}

/* ---- sockets and handshake ---- */

typedef struct {
  int fd, rc;
  wire_hello local, peer;
  ts_err err;
} hs_arg;

static void *accept_thread(void *p) {
  hs_arg *a = p;
  a->rc = wire_handshake_accept(a->fd, &a->local, &a->peer, net_now_ms() + 5000, &a->err);
  return NULL;
}

/* Runs one handshake over a socket pair; returns the connecting side's status. */
static int handshake(const wire_hello *server, const wire_hello *client, hs_arg *srv,
                     wire_hello *got, ts_err *err) {
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  memset(srv, 0, sizeof *srv);
  srv->fd = sv[0];
  srv->local = *server;
  pthread_t th;
  pthread_create(&th, NULL, accept_thread, srv);
  int rc = wire_handshake_connect(sv[1], client, got, net_now_ms() + 5000, err);
  pthread_join(th, NULL);
  close(sv[0]);
  close(sv[1]);
  return rc;
}

static void test_sockets(test_rng *r) {
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  ts_err err = {0};
  /* A frame bigger than a socket buffer, sent from a thread while this one receives. */
  wire_buf w;
  wire_buf_init(&w);
  size_t nf = 300000 + rnd(r, 100000);
  float *logits = malloc(nf * 4);
  for (size_t i = 0; i < nf; i++) logits[i] = test_rng_float(r);
  wire_result res = {.step_id = 7, .kind = WIRE_RESULT_LOGITS, .n_rows = 1, .vocab = (int32_t)nf,
                     .logits = logits};
  CHECK(wire_encode_result(&w, &res, &err) == 0);
  pid_t child = fork();
  if (child == 0) {
    close(sv[0]);
    _exit(wire_send(sv[1], &w, net_now_ms() + 10000, NULL) == 0 ? 0 : 1);
  }
  close(sv[1]);
  wire_frame f = {0};
  CHECK(wire_recv_frame(sv[0], &f, 0, net_now_ms() + 10000, &err) == 0);
  wire_result got;
  CHECK(f.type == WIRE_MSG_RESULT && wire_decode_result(f.payload, f.len, &got, &err) == 0);
  CHECK(got.vocab == (int32_t)nf && memcmp(got.logits, logits, nf * 4) == 0);
  wire_result_free(&got);
  /* The sender is gone: the next receive fails, it does not hang. */
  CHECK(wire_recv_frame(sv[0], &f, 0, net_now_ms() + 10000, &err) == TS_ENET);
  /* A frame over the receiver's limit is refused from its header. */
  int st = 0;
  waitpid(child, &st, 0);
  CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  close(sv[0]);
  CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  CHECK(wire_send(sv[1], &w, net_now_ms() + 100, &err) == TS_ETIMEOUT); /* nobody reads */
  CHECK(wire_recv_frame(sv[0], &f, 1000, net_now_ms() + 1000, &err) == TS_EPROTO);
  CHECK(strstr(err.msg, "exceeds") != NULL);
  /* Silence: a receive times out at its deadline. */
  close(sv[0]);
  close(sv[1]);
  CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  CHECK(wire_recv_frame(sv[0], &f, 0, net_now_ms() + 50, &err) == TS_ETIMEOUT);
  close(sv[0]);
  close(sv[1]);
  wire_frame_free(&f);
  wire_buf_free(&w);
  free(logits);

  /* Handshakes. */
  wire_hello srv, cli, got_h;
  random_hello(r, &srv);
  srv.world_size = 4;
  srv.rank = 0;
  cli = srv;
  cli.rank = 1 + (int32_t)rnd(r, 3);
  hs_arg a;
  CHECK_MSG(handshake(&srv, &cli, &a, &got_h, &err) == 0, "%s", err.msg);
  CHECK(a.rc == 0 && a.peer.rank == cli.rank && got_h.rank == 0);
  struct {
    const char *what, *expect;
  } cases[] = {{"secret", "wrong launch secret"}, {"group", "group id"},
               {"fingerprint", "model fingerprint"}, {"world", "world size"},
               {"rank", "outside a world"}};
  for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
    cli = srv;
    cli.rank = 1;
    if (k == 0) cli.secret[rnd(r, WIRE_SECRET_LEN)] ^= (uint8_t)(1 + rnd(r, 255));
    if (k == 1) cli.group_id ^= 1 + rnd(r, 1000);
    if (k == 2) cli.fingerprint ^= 1 + rnd(r, 1000);
    if (k == 3) cli.world_size = 5;
    if (k == 4) cli.rank = 4;
    ts_err e = {0};
    CHECK(handshake(&srv, &cli, &a, &got_h, &e) == TS_EPROTO && a.rc == TS_EPROTO);
    CHECK_MSG(strstr(e.msg, cases[k].expect) != NULL, "%s: client says %s", cases[k].what, e.msg);
    CHECK_MSG(strstr(a.err.msg, cases[k].expect) != NULL, "%s: server says %s", cases[k].what,
              a.err.msg);
  }
}

int main(void) {
  uint64_t seed = 0xd1b54a32d192ed03ull ^ ((uint64_t)getpid() << 24);
  fprintf(stderr, "test_wire seed %llu\n", (unsigned long long)seed);
  test_rng r = {seed};
  test_steps(&r);
  test_results_hidden(&r);
  test_control(&r);
  test_sockets(&r);
  return test_finish("test_wire");
}
