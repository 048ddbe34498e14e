/* The driver<->worker wire protocol: little-endian encoding helpers, frame headers, message
 * encoders/decoders (pure, bounds-checked) and whole-frame socket I/O plus the handshake. */
#include "dist/wire.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>

#include "dist/net.h"
#include "util/log.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#define WIRE_SWAP 1
#else
#define WIRE_SWAP 0
#endif

static_assert(sizeof(float) == 4, "wire floats are IEEE binary32");

const char *wire_msg_name(int type) {
  static const char *names[WIRE_MSG_END_] = {
      [WIRE_MSG_HELLO] = "HELLO",   [WIRE_MSG_HELLO_ACK] = "HELLO_ACK",
      [WIRE_MSG_PEERS] = "PEERS",   [WIRE_MSG_STEP] = "STEP",
      [WIRE_MSG_RESULT] = "RESULT", [WIRE_MSG_HIDDEN] = "HIDDEN",
      [WIRE_MSG_PING] = "PING",     [WIRE_MSG_PONG] = "PONG",
      [WIRE_MSG_SHUTDOWN] = "SHUTDOWN", [WIRE_MSG_ERROR] = "ERROR",
      [WIRE_MSG_INFO] = "INFO",     [WIRE_MSG_INIT_KV] = "INIT_KV"};
  return (type > 0 && type < WIRE_MSG_END_ && names[type]) ? names[type] : "UNKNOWN";
}

/* ---- wire_buf ---- */

void wire_buf_init(wire_buf *b) { memset(b, 0, sizeof *b); }
void wire_buf_free(wire_buf *b) {
  free(b->data);
  memset(b, 0, sizeof *b);
}
void wire_buf_reset(wire_buf *b) {
  b->len = 0;
  b->failed = 0;
}

static uint8_t *buf_grow(wire_buf *b, size_t n) {
  if (b->failed) return NULL;
  if (n > SIZE_MAX - b->len) {
    b->failed = 1;
    return NULL;
  }
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n) cap = cap > SIZE_MAX / 2 ? b->len + n : cap * 2;
    uint8_t *d = realloc(b->data, cap);
    if (!d) {
      b->failed = 1;
      return NULL;
    }
    b->data = d;
    b->cap = cap;
  }
  uint8_t *p = b->data + b->len;
  b->len += n;
  return p;
}

static void store_le(uint8_t *p, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint64_t load_le(const uint8_t *p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++) v |= (uint64_t)p[i] << (8 * i);
  return v;
}

void wire_put_u8(wire_buf *b, uint8_t v) {
  uint8_t *p = buf_grow(b, 1);
  if (p) *p = v;
}
void wire_put_u16(wire_buf *b, uint16_t v) {
  uint8_t *p = buf_grow(b, 2);
  if (p) store_le(p, v, 2);
}
void wire_put_u32(wire_buf *b, uint32_t v) {
  uint8_t *p = buf_grow(b, 4);
  if (p) store_le(p, v, 4);
}
void wire_put_u64(wire_buf *b, uint64_t v) {
  uint8_t *p = buf_grow(b, 8);
  if (p) store_le(p, v, 8);
}
void wire_put_i32(wire_buf *b, int32_t v) { wire_put_u32(b, (uint32_t)v); }
void wire_put_f32(wire_buf *b, float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  wire_put_u32(b, u);
}
void wire_put_bytes(wire_buf *b, const void *src, size_t n) {
  if (n == 0) return;
  uint8_t *p = buf_grow(b, n);
  if (p) memcpy(p, src, n);
}
void wire_put_str(wire_buf *b, const char *s) {
  size_t n = s ? strlen(s) : 0;
  if (n > UINT32_MAX) {
    b->failed = 1;
    return;
  }
  wire_put_u32(b, (uint32_t)n);
  wire_put_bytes(b, s, n);
}

/* 4-byte elements: a straight copy on little-endian hosts. */
static void put_words(wire_buf *b, const void *v, size_t n) {
  if (n == 0) return;
  if (n > SIZE_MAX / 4) {
    b->failed = 1;
    return;
  }
  uint8_t *p = buf_grow(b, n * 4);
  if (!p) return;
  if (!WIRE_SWAP) {
    memcpy(p, v, n * 4);
    return;
  }
  const uint8_t *s = v;
  for (size_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, s + 4 * i, 4);
    store_le(p + 4 * i, u, 4);
  }
}
void wire_put_i32_array(wire_buf *b, const int32_t *v, size_t n) { put_words(b, v, n); }
void wire_put_f32_array(wire_buf *b, const float *v, size_t n) { put_words(b, v, n); }

/* ---- wire_reader ---- */

void wire_reader_init(wire_reader *r, const void *p, size_t len) {
  r->p = p;
  r->len = p ? len : 0;
  r->off = 0;
  r->failed = 0;
}

const uint8_t *wire_get_bytes(wire_reader *r, size_t n) {
  if (r->failed || n > r->len - r->off) {
    r->failed = 1;
    return NULL;
  }
  const uint8_t *p = r->p + r->off;
  r->off += n;
  return p;
}
uint8_t wire_get_u8(wire_reader *r) {
  const uint8_t *p = wire_get_bytes(r, 1);
  return p ? *p : 0;
}
uint16_t wire_get_u16(wire_reader *r) {
  const uint8_t *p = wire_get_bytes(r, 2);
  return p ? (uint16_t)load_le(p, 2) : 0;
}
uint32_t wire_get_u32(wire_reader *r) {
  const uint8_t *p = wire_get_bytes(r, 4);
  return p ? (uint32_t)load_le(p, 4) : 0;
}
uint64_t wire_get_u64(wire_reader *r) {
  const uint8_t *p = wire_get_bytes(r, 8);
  return p ? load_le(p, 8) : 0;
}
int32_t wire_get_i32(wire_reader *r) { return (int32_t)wire_get_u32(r); }
float wire_get_f32(wire_reader *r) {
  uint32_t u = wire_get_u32(r);
  float f;
  memcpy(&f, &u, 4);
  return f;
}
void wire_get_str(wire_reader *r, char *out, size_t cap) {
  uint32_t n = wire_get_u32(r);
  const uint8_t *p = r->failed ? NULL : wire_get_bytes(r, n);
  if (!p || (size_t)n >= cap || memchr(p, '\0', n)) {
    r->failed = 1;
    if (cap) out[0] = '\0';
    return;
  }
  memcpy(out, p, n);
  out[n] = '\0';
}
static void get_words(wire_reader *r, void *out, size_t n) {
  if (n == 0) return;
  const uint8_t *p = n > SIZE_MAX / 4 ? NULL : wire_get_bytes(r, n * 4);
  if (!p) {
    r->failed = 1;
    return;
  }
  if (!WIRE_SWAP) {
    memcpy(out, p, n * 4);
    return;
  }
  uint8_t *d = out;
  for (size_t i = 0; i < n; i++) {
    uint32_t u = (uint32_t)load_le(p + 4 * i, 4);
    memcpy(d + 4 * i, &u, 4);
  }
}
void wire_get_i32_array(wire_reader *r, int32_t *out, size_t n) { get_words(r, out, n); }
void wire_get_f32_array(wire_reader *r, float *out, size_t n) { get_words(r, out, n); }

/* ---- frames ---- */

int wire_header_decode(const uint8_t *p, size_t n, size_t max_payload, wire_header *h,
                       ts_err *err) {
  if (n < WIRE_HEADER_SIZE)
    return ts_errorf(err, TS_EPROTO, "frame header truncated (%zu of %d bytes)", n,
                     WIRE_HEADER_SIZE);
  uint32_t magic = (uint32_t)load_le(p, 4);
  if (magic != WIRE_MAGIC)
    return ts_errorf(err, TS_EPROTO, "bad frame magic 0x%08x (not a tessera peer?)", magic);
  h->version = (uint16_t)load_le(p + 4, 2);
  h->type = (uint16_t)load_le(p + 6, 2);
  h->length = (uint32_t)load_le(p + 8, 4);
  if (h->version != WIRE_VERSION)
    return ts_errorf(err, TS_EPROTO, "peer speaks wire version %u, this build speaks %d",
                     h->version, WIRE_VERSION);
  if (h->type == 0 || h->type >= WIRE_MSG_END_)
    return ts_errorf(err, TS_EPROTO, "unknown message type %u", h->type);
  if (max_payload == 0) max_payload = WIRE_MAX_FRAME;
  if (h->length > max_payload)
    return ts_errorf(err, TS_EPROTO, "%s frame of %u bytes exceeds the limit of %zu",
                     wire_msg_name(h->type), h->length, max_payload);
  return 0;
}

/* Every encoder goes through here: remember where the frame starts, write the payload, patch
 * the length. */
typedef struct {
  wire_buf *b;
  size_t start;
} frame_ctx;

static frame_ctx frame_open(wire_buf *b, int type) {
  frame_ctx f = {b, b->len};
  wire_put_u32(b, WIRE_MAGIC);
  wire_put_u16(b, WIRE_VERSION);
  wire_put_u16(b, (uint16_t)type);
  wire_put_u32(b, 0); /* length, patched by frame_close */
  return f;
}

static int frame_close(frame_ctx f, ts_err *err) {
  wire_buf *b = f.b;
  if (b->failed) return ts_errorf(err, TS_ENOMEM, "out of memory encoding a frame");
  size_t payload = b->len - f.start - WIRE_HEADER_SIZE;
  if (payload > WIRE_MAX_FRAME) {
    b->len = f.start;
    return ts_errorf(err, TS_ERANGE, "frame of %zu bytes exceeds the limit of %zu", payload,
                     WIRE_MAX_FRAME);
  }
  store_le(b->data + f.start + 8, payload, 4);
  return 0;
}

static int decode_done(wire_reader *r, const char *what, ts_err *err) {
  if (r->failed) return ts_errorf(err, TS_EPROTO, "%s payload truncated or malformed", what);
  if (wire_reader_left(r))
    return ts_errorf(err, TS_EPROTO, "%s payload has %zu trailing bytes", what,
                     wire_reader_left(r));
  return 0;
}

/* Do count elements of elem bytes fill the rest of the payload exactly? Divides rather than
 * multiplies: counts from the wire can make count * elem wrap around. */
static int words_fit(uint64_t count, unsigned elem, const wire_reader *r) {
  size_t left = wire_reader_left(r);
  return left % elem == 0 && count == left / elem;
}

/* ---- hello ---- */

static void put_hello(wire_buf *b, const wire_hello *h) {
  wire_put_u8(b, h->role);
  wire_put_u64(b, h->fingerprint);
  wire_put_u64(b, h->group_id);
  wire_put_bytes(b, h->secret, WIRE_SECRET_LEN);
  wire_put_i32(b, h->rank);
  wire_put_i32(b, h->world_size);
  wire_put_i32(b, h->tp_rank);
  wire_put_i32(b, h->tp_size);
  wire_put_i32(b, h->pp_rank);
  wire_put_i32(b, h->pp_size);
  wire_put_i32(b, h->port);
  wire_put_str(b, h->host);
}

static void get_hello(wire_reader *r, wire_hello *h) {
  memset(h, 0, sizeof *h);
  h->role = wire_get_u8(r);
  h->fingerprint = wire_get_u64(r);
  h->group_id = wire_get_u64(r);
  const uint8_t *s = wire_get_bytes(r, WIRE_SECRET_LEN);
  if (s) memcpy(h->secret, s, WIRE_SECRET_LEN);
  h->rank = wire_get_i32(r);
  h->world_size = wire_get_i32(r);
  h->tp_rank = wire_get_i32(r);
  h->tp_size = wire_get_i32(r);
  h->pp_rank = wire_get_i32(r);
  h->pp_size = wire_get_i32(r);
  h->port = wire_get_i32(r);
  wire_get_str(r, h->host, sizeof h->host);
}

int wire_encode_hello(wire_buf *b, const wire_hello *h, ts_err *err) {
  frame_ctx f = frame_open(b, WIRE_MSG_HELLO);
  put_hello(b, h);
  return frame_close(f, err);
}

int wire_decode_hello(const uint8_t *p, size_t n, wire_hello *out, ts_err *err) {
  wire_reader r;
  wire_reader_init(&r, p, n);
  get_hello(&r, out);
  return decode_done(&r, "HELLO", err);
}

int wire_encode_hello_ack(wire_buf *b, const wire_hello_ack *a, ts_err *err) {
  frame_ctx f = frame_open(b, WIRE_MSG_HELLO_ACK);
  wire_put_i32(b, a->status);
  wire_put_str(b, a->reason);
  put_hello(b, &a->hello);
  return frame_close(f, err);
}

int wire_decode_hello_ack(const uint8_t *p, size_t n, wire_hello_ack *out, ts_err *err) {
  wire_reader r;
  wire_reader_init(&r, p, n);
  memset(out, 0, sizeof *out);
  out->status = wire_get_i32(&r);
  wire_get_str(&r, out->reason, sizeof out->reason);
  get_hello(&r, &out->hello);
  return decode_done(&r, "HELLO_ACK", err);
}

/* ---- peers ---- */

int wire_encode_peers(wire_buf *b, const wire_peers *p, ts_err *err) {
  if (p->n < 0 || p->n > WIRE_MAX_PEERS)
    return ts_errorf(err, TS_EINVAL, "peer table of %d entries", p->n);
  frame_ctx f = frame_open(b, WIRE_MSG_PEERS);
  wire_put_u32(b, (uint32_t)p->n);
  for (int i = 0; i < p->n; i++) {
    wire_put_str(b, p->peers[i].host);
    wire_put_i32(b, p->peers[i].port);
  }
  return frame_close(f, err);
}

int wire_decode_peers(const uint8_t *p, size_t n, wire_peers *out, ts_err *err) {
  wire_reader r;
  wire_reader_init(&r, p, n);
  memset(out, 0, sizeof *out);
  uint32_t count = wire_get_u32(&r);
  /* Each entry takes at least 8 bytes, so a count the payload cannot hold is rejected before
   * anything is allocated. */
  if (r.failed || count > WIRE_MAX_PEERS || count > wire_reader_left(&r) / 8)
    return ts_errorf(err, TS_EPROTO, "PEERS count %u does not fit the payload", count);
  out->peers = calloc(count ? count : 1, sizeof *out->peers);
  if (!out->peers) return ts_errorf(err, TS_ENOMEM, "out of memory decoding PEERS");
  out->n = (int)count;
  for (uint32_t i = 0; i < count; i++) {
    wire_get_str(&r, out->peers[i].host, sizeof out->peers[i].host);
    out->peers[i].port = wire_get_i32(&r);
    if (!r.failed && (out->peers[i].port < 0 || out->peers[i].port > 65535)) r.failed = 1;
  }
  int rc = decode_done(&r, "PEERS", err);
  if (rc < 0) wire_peers_free(out);
  return rc;
}

void wire_peers_free(wire_peers *p) {
  free(p->peers);
  p->peers = NULL;
  p->n = 0;
}

/* ---- step ---- */

int wire_batch_validate(const ts_batch *b, ts_err *err) {
  if (b->n_tokens < 0 || b->n_seqs < 0 || b->max_blocks < 0 || b->n_logits < 0)
    return ts_errorf(err, TS_EPROTO, "negative count in step plan (tokens %d, seqs %d, "
                     "blocks %d, logits %d)", b->n_tokens, b->n_seqs, b->max_blocks, b->n_logits);
  if ((b->n_tokens && (!b->tokens || !b->pos)) || (b->n_seqs && (!b->seq_start || !b->ctx_len)) ||
      (b->n_seqs && b->max_blocks && !b->block_table) || (b->n_logits && !b->logits_rows))
    return ts_errorf(err, TS_EINVAL, "step plan has a missing array");
  if (b->seq_start) {
    if (b->seq_start[0] != 0 || b->seq_start[b->n_seqs] != b->n_tokens)
      return ts_errorf(err, TS_EPROTO, "step plan seq_start spans [%d, %d), not [0, %d)",
                       b->seq_start[0], b->seq_start[b->n_seqs], b->n_tokens);
    for (int s = 0; s < b->n_seqs; s++) {
      /* Order first: the difference of a decreasing pair can overflow. */
      if (b->seq_start[s + 1] < b->seq_start[s])
        return ts_errorf(err, TS_EPROTO, "step plan seq_start decreases at sequence %d", s);
      int len = b->seq_start[s + 1] - b->seq_start[s];
      if (b->ctx_len[s] < len)
        return ts_errorf(err, TS_EPROTO, "sequence %d: ctx_len %d < its %d new tokens", s,
                         b->ctx_len[s], len);
    }
  } else if (b->n_tokens) {
    return ts_errorf(err, TS_EPROTO, "step plan has %d tokens but no sequences", b->n_tokens);
  }
  for (int i = 0; i < b->n_tokens; i++)
    if (b->pos[i] < 0 || b->tokens[i] < 0)
      return ts_errorf(err, TS_EPROTO, "step plan token %d: id %d at position %d", i,
                       b->tokens[i], b->pos[i]);
  for (int i = 0; i < b->n_logits; i++)
    if (b->logits_rows[i] < 0 || b->logits_rows[i] >= b->n_tokens)
      return ts_errorf(err, TS_EPROTO, "step plan logits row %d out of [0, %d)",
                       b->logits_rows[i], b->n_tokens);
  return 0;
}

/* What a sampled row may say; the device sampler relies on it. */
static int sample_row_check(const ts_sample_row *s, int i, ts_err *err) {
  int ok = isfinite(s->temperature) && s->temperature >= 0 && isfinite(s->top_p) &&
           s->top_p > 0 && s->top_p <= 1 && isfinite(s->min_p) && s->min_p >= 0 &&
           s->min_p <= 1 && s->top_k >= -1 && isfinite(s->presence_penalty) &&
           isfinite(s->frequency_penalty) && isfinite(s->repetition_penalty) &&
           s->repetition_penalty > 0 && s->n_penalty >= 0 &&
           (s->n_penalty == 0 || (s->penalty_ids && s->penalty_counts));
  for (int k = 0; ok && k < s->n_penalty; k++)
    ok = s->penalty_ids[k] >= 0 && s->penalty_counts[k] >= 0;
  if (!ok) return ts_errorf(err, TS_EPROTO, "STEP sampling row %d is out of range", i);
  return 0;
}

/* Per row: f32 temperature, top_p, min_p | i32 top_k | f32 presence, frequency, repetition
 * penalties | u64 seed, counter | i32 n_penalty, then ids [n_penalty] and counts [n_penalty]. */
#define WIRE_SAMPLE_ROW_BYTES 48

static void put_sample_rows(wire_buf *b, const ts_sample_row *rows, int n) {
  for (int i = 0; i < n; i++) {
    const ts_sample_row *s = &rows[i];
    wire_put_f32(b, s->temperature);
    wire_put_f32(b, s->top_p);
    wire_put_f32(b, s->min_p);
    wire_put_i32(b, s->top_k);
    wire_put_f32(b, s->presence_penalty);
    wire_put_f32(b, s->frequency_penalty);
    wire_put_f32(b, s->repetition_penalty);
    wire_put_u64(b, s->seed);
    wire_put_u64(b, s->counter);
    wire_put_i32(b, s->n_penalty);
    wire_put_i32_array(b, s->penalty_ids, (size_t)s->n_penalty);
    wire_put_i32_array(b, s->penalty_counts, (size_t)s->n_penalty);
  }
}

/* rows [n] and their penalty arrays, carved from one allocation that the payload bounds. */
static int get_sample_rows(wire_reader *r, int n, ts_sample_row **rows_out, void **mem_out,
                           ts_err *err) {
  size_t left = wire_reader_left(r);
  if ((uint64_t)n * WIRE_SAMPLE_ROW_BYTES > left)
    return ts_errorf(err, TS_EPROTO, "STEP has %d sampling rows in %zu bytes", n, left);
  size_t words = (left - (size_t)n * WIRE_SAMPLE_ROW_BYTES) / 4;
  ts_sample_row *rows = calloc(n ? (size_t)n : 1, sizeof *rows);
  int32_t *pool = malloc(words ? words * 4 : 1);
  if (!rows || !pool) {
    free(rows);
    free(pool);
    return ts_errorf(err, TS_ENOMEM, "out of memory decoding STEP");
  }
  size_t used = 0;
  int rc = 0;
  for (int i = 0; i < n && rc == 0; i++) {
    ts_sample_row *s = &rows[i];
    s->temperature = wire_get_f32(r);
    s->top_p = wire_get_f32(r);
    s->min_p = wire_get_f32(r);
    s->top_k = wire_get_i32(r);
    s->presence_penalty = wire_get_f32(r);
    s->frequency_penalty = wire_get_f32(r);
    s->repetition_penalty = wire_get_f32(r);
    s->seed = wire_get_u64(r);
    s->counter = wire_get_u64(r);
    int32_t np = wire_get_i32(r);
    if (r->failed || np < 0 || 2 * (uint64_t)np > words - used ||
        8 * (uint64_t)np > wire_reader_left(r)) {
      rc = ts_errorf(err, TS_EPROTO, "STEP sampling row %d is truncated", i);
      break;
    }
    s->n_penalty = np;
    s->penalty_ids = pool + used;
    s->penalty_counts = pool + used + np;
    wire_get_i32_array(r, pool + used, (size_t)np);
    wire_get_i32_array(r, pool + used + np, (size_t)np);
    used += 2 * (size_t)np;
    rc = sample_row_check(s, i, err);
  }
  if (rc < 0) {
    free(rows);
    free(pool);
    return rc;
  }
  *rows_out = rows;
  mem_out[0] = rows;
  mem_out[1] = pool;
  return 0;
}

int wire_encode_step(wire_buf *b, uint64_t step_id, uint32_t flags, const ts_batch *batch,
                     const ts_sample_row *rows, ts_err *err) {
  ts_batch bt = *batch;
  int32_t zero = 0;
  if (bt.n_seqs == 0 && !bt.seq_start) bt.seq_start = &zero;
  TS_TRY(wire_batch_validate(&bt, err));
  int sample = (flags & WIRE_STEP_SAMPLE) != 0;
  if (sample && bt.n_logits > 0 && !rows)
    return ts_errorf(err, TS_EINVAL, "a sampled STEP needs its sampling rows");
  for (int i = 0; sample && i < bt.n_logits; i++) TS_TRY(sample_row_check(&rows[i], i, err));
  frame_ctx f = frame_open(b, WIRE_MSG_STEP);
  wire_put_u64(b, step_id);
  wire_put_u32(b, flags);
  wire_put_i32(b, bt.n_tokens);
  wire_put_i32(b, bt.n_seqs);
  wire_put_i32(b, bt.max_blocks);
  wire_put_i32(b, bt.n_logits);
  wire_put_i32_array(b, bt.tokens, (size_t)bt.n_tokens);
  wire_put_i32_array(b, bt.pos, (size_t)bt.n_tokens);
  wire_put_i32_array(b, bt.seq_start, (size_t)bt.n_seqs + 1);
  wire_put_i32_array(b, bt.ctx_len, (size_t)bt.n_seqs);
  wire_put_i32_array(b, bt.block_table, (size_t)bt.n_seqs * (size_t)bt.max_blocks);
  wire_put_i32_array(b, bt.logits_rows, (size_t)bt.n_logits);
  if (sample) put_sample_rows(b, rows, bt.n_logits);
  return frame_close(f, err);
}

int wire_decode_step(const uint8_t *p, size_t n, wire_step *out, ts_err *err) {
  wire_reader r;
  wire_reader_init(&r, p, n);
  memset(out, 0, sizeof *out);
  out->step_id = wire_get_u64(&r);
  out->flags = wire_get_u32(&r);
  int32_t nt = wire_get_i32(&r), ns = wire_get_i32(&r), mb = wire_get_i32(&r),
          nl = wire_get_i32(&r);
  if (r.failed) return ts_errorf(err, TS_EPROTO, "STEP payload truncated");
  if (nt < 0 || ns < 0 || mb < 0 || nl < 0)
    return ts_errorf(err, TS_EPROTO, "STEP has a negative count");
  /* The counts must account for the payload exactly; this also bounds the allocation. */
  uint64_t words = 2 * (uint64_t)nt + 2 * (uint64_t)ns + 1 + (uint64_t)ns * (uint64_t)mb +
                   (uint64_t)nl;
  int sample = (out->flags & WIRE_STEP_SAMPLE) != 0;
  if (out->flags & ~(uint32_t)WIRE_STEP_SAMPLE)
    return ts_errorf(err, TS_EPROTO, "STEP has unknown flags 0x%x", out->flags);
  /* Sampled steps carry their rows after the batch: the batch's words must fit, without the
   * byte count wrapping around (words can approach 2^62). */
  if (sample ? words > wire_reader_left(&r) / 4 : !words_fit(words, 4, &r))
    return ts_errorf(err, TS_EPROTO, "STEP counts need %llu words, payload has %zu bytes",
                     (unsigned long long)words, wire_reader_left(&r));
  int32_t *mem = malloc((size_t)words * 4);
  if (!mem) return ts_errorf(err, TS_ENOMEM, "out of memory decoding STEP");
  wire_get_i32_array(&r, mem, (size_t)words);
  ts_batch *bt = &out->batch;
  int32_t *q = mem;
  bt->n_tokens = nt;
  bt->tokens = q, q += nt;
  bt->pos = q, q += nt;
  bt->n_seqs = ns;
  bt->seq_start = q, q += ns + 1;
  bt->ctx_len = q, q += ns;
  bt->max_blocks = mb;
  bt->block_table = q, q += (size_t)ns * (size_t)mb;
  bt->n_logits = nl;
  bt->logits_rows = q;
  /* mem_ holds three blocks: the batch's words, the sampling rows, their penalty arrays. */
  void **blocks = calloc(3, sizeof *blocks);
  if (!blocks) {
    free(mem);
    return ts_errorf(err, TS_ENOMEM, "out of memory decoding STEP");
  }
  blocks[0] = mem;
  out->mem_ = blocks;
  int rc = sample ? get_sample_rows(&r, nl, &out->rows, blocks + 1, err) : 0;
  if (rc == 0) rc = decode_done(&r, "STEP", err);
  if (rc == 0) rc = wire_batch_validate(bt, err);
  if (rc < 0) wire_step_free(out);
  return rc;
}

void wire_step_free(wire_step *s) {
  void **blocks = s->mem_;
  if (blocks)
    for (int i = 0; i < 3; i++) free(blocks[i]);
  free(blocks);
  memset(s, 0, sizeof *s);
}

/* ---- result ---- */

int wire_encode_result(wire_buf *b, const wire_result *res, ts_err *err) {
  if (res->n_rows < 0 || (res->kind != WIRE_RESULT_TOKENS && res->kind != WIRE_RESULT_LOGITS) ||
      (res->kind == WIRE_RESULT_LOGITS && res->vocab < 0))
    return ts_errorf(err, TS_EINVAL, "bad result (kind %d, rows %d, vocab %d)", res->kind,
                     res->n_rows, res->vocab);
  frame_ctx f = frame_open(b, WIRE_MSG_RESULT);
  wire_put_u64(b, res->step_id);
  wire_put_i32(b, res->kind);
  wire_put_i32(b, res->n_rows);
  if (res->kind == WIRE_RESULT_TOKENS) {
    wire_put_i32(b, 0);
    wire_put_u8(b, res->logprobs ? 1 : 0);
    wire_put_i32_array(b, res->tokens, (size_t)res->n_rows);
    if (res->logprobs) wire_put_f32_array(b, res->logprobs, (size_t)res->n_rows);
  } else {
    wire_put_i32(b, res->vocab);
    wire_put_u8(b, 0);
    wire_put_f32_array(b, res->logits, (size_t)res->n_rows * (size_t)res->vocab);
  }
  return frame_close(f, err);
}

int wire_decode_result(const uint8_t *p, size_t n, wire_result *out, ts_err *err) {
  wire_reader r;
  wire_reader_init(&r, p, n);
  memset(out, 0, sizeof *out);
  out->step_id = wire_get_u64(&r);
  out->kind = wire_get_i32(&r);
  out->n_rows = wire_get_i32(&r);
  out->vocab = wire_get_i32(&r);
  uint8_t has_lp = wire_get_u8(&r);
  if (r.failed) return ts_errorf(err, TS_EPROTO, "RESULT payload truncated");
  if (out->n_rows < 0 || out->vocab < 0 || has_lp > 1)
    return ts_errorf(err, TS_EPROTO, "RESULT has a bad header (rows %d, vocab %d)", out->n_rows,
                     out->vocab);
  uint64_t words;
  if (out->kind == WIRE_RESULT_TOKENS)
    words = (uint64_t)out->n_rows * (has_lp ? 2 : 1);
  else if (out->kind == WIRE_RESULT_LOGITS && !has_lp)
    words = (uint64_t)out->n_rows * (uint64_t)out->vocab;
  else
    return ts_errorf(err, TS_EPROTO, "RESULT kind %d unknown", out->kind);
  if (!words_fit(words, 4, &r))
    return ts_errorf(err, TS_EPROTO, "RESULT needs %llu words, payload has %zu bytes",
                     (unsigned long long)words, wire_reader_left(&r));
  void *mem = malloc(words ? (size_t)words * 4 : 1);
  if (!mem) return ts_errorf(err, TS_ENOMEM, "out of memory decoding RESULT");
  out->mem_ = mem;
  if (out->kind == WIRE_RESULT_TOKENS) {
    out->tokens = mem;
    wire_get_i32_array(&r, out->tokens, (size_t)out->n_rows);
    if (has_lp) {
      out->logprobs = (float *)mem + out->n_rows;
      wire_get_f32_array(&r, out->logprobs, (size_t)out->n_rows);
    }
  } else {
    out->logits = mem;
    wire_get_f32_array(&r, out->logits, (size_t)words);
  }
  int rc = decode_done(&r, "RESULT", err);
  if (rc < 0) wire_result_free(out);
  return rc;
}

void wire_result_free(wire_result *r) {
  free(r->mem_);
  memset(r, 0, sizeof *r);
}

/* ---- hidden states ---- */

static int hidden_elem_size(int32_t dtype) {
  return dtype == TS_F32 ? 4 : (dtype == TS_F16 || dtype == TS_BF16) ? 2 : 0;
}

int wire_encode_hidden(wire_buf *b, const wire_hidden *h, ts_err *err) {
  int es = hidden_elem_size(h->dtype);
  if (!es || h->n_tokens < 0 || h->dim < 0)
    return ts_errorf(err, TS_EINVAL, "bad hidden states (dtype %d, %d x %d)", h->dtype,
                     h->n_tokens, h->dim);
  size_t nel = (size_t)h->n_tokens * (size_t)h->dim;
  frame_ctx f = frame_open(b, WIRE_MSG_HIDDEN);
  wire_put_u64(b, h->step_id);
  wire_put_i32(b, h->n_tokens);
  wire_put_i32(b, h->dim);
  wire_put_i32(b, h->dtype);
  if (es == 4) {
    wire_put_f32_array(b, h->data, nel);
  } else {
    const uint16_t *s = h->data;
    uint8_t *d = nel ? buf_grow(b, nel * 2) : NULL;
    for (size_t i = 0; d && i < nel; i++) store_le(d + 2 * i, s[i], 2);
  }
  return frame_close(f, err);
}

int wire_decode_hidden(const uint8_t *p, size_t n, wire_hidden *out, ts_err *err) {
  wire_reader r;
  wire_reader_init(&r, p, n);
  memset(out, 0, sizeof *out);
  out->step_id = wire_get_u64(&r);
  out->n_tokens = wire_get_i32(&r);
  out->dim = wire_get_i32(&r);
  out->dtype = wire_get_i32(&r);
  int es = hidden_elem_size(out->dtype);
  if (r.failed || !es || out->n_tokens < 0 || out->dim < 0)
    return ts_errorf(err, TS_EPROTO, "HIDDEN has a bad header (dtype %d, %d x %d)", out->dtype,
                     out->n_tokens, out->dim);
  uint64_t nel = (uint64_t)out->n_tokens * (uint64_t)out->dim;
  if (!words_fit(nel, (unsigned)es, &r))
    return ts_errorf(err, TS_EPROTO, "HIDDEN needs %llu elements, payload has %zu bytes",
                     (unsigned long long)nel, wire_reader_left(&r));
  void *mem = malloc(nel ? (size_t)nel * (size_t)es : 1);
  if (!mem) return ts_errorf(err, TS_ENOMEM, "out of memory decoding HIDDEN");
  out->mem_ = out->data = mem;
  if (es == 4) {
    wire_get_f32_array(&r, mem, (size_t)nel);
  } else {
    const uint8_t *s = wire_get_bytes(&r, (size_t)nel * 2);
    uint16_t *d = mem;
    for (size_t i = 0; s && i < nel; i++) d[i] = (uint16_t)load_le(s + 2 * i, 2);
  }
  int rc = decode_done(&r, "HIDDEN", err);
  if (rc < 0) wire_hidden_free(out);
  return rc;
}

void wire_hidden_free(wire_hidden *h) {
  free(h->mem_);
  memset(h, 0, sizeof *h);
}

/* ---- ping, shutdown, error ---- */

int wire_encode_ping(wire_buf *b, int type, const wire_ping *p, ts_err *err) {
  if (type != WIRE_MSG_PING && type != WIRE_MSG_PONG)
    return ts_errorf(err, TS_EINVAL, "ping frame of type %s", wire_msg_name(type));
  frame_ctx f = frame_open(b, type);
  wire_put_u64(b, p->seq);
  wire_put_u64(b, p->time_ms);
  wire_put_i32(b, p->status);
  return frame_close(f, err);
}

int wire_decode_ping(const uint8_t *p, size_t n, wire_ping *out, ts_err *err) {
  wire_reader r;
  wire_reader_init(&r, p, n);
  out->seq = wire_get_u64(&r);
  out->time_ms = wire_get_u64(&r);
  out->status = wire_get_i32(&r);
  return decode_done(&r, "PING", err);
}

int wire_encode_shutdown(wire_buf *b, const char *reason, ts_err *err) {
  frame_ctx f = frame_open(b, WIRE_MSG_SHUTDOWN);
  wire_put_str(b, reason ? reason : "");
  return frame_close(f, err);
}

int wire_decode_shutdown(const uint8_t *p, size_t n, char *reason, size_t cap, ts_err *err) {
  wire_reader r;
  wire_reader_init(&r, p, n);
  wire_get_str(&r, reason, cap);
  return decode_done(&r, "SHUTDOWN", err);
}

int wire_encode_error(wire_buf *b, const wire_error *e, ts_err *err) {
  frame_ctx f = frame_open(b, WIRE_MSG_ERROR);
  wire_put_u64(b, e->step_id);
  wire_put_i32(b, e->code);
  wire_put_str(b, e->message);
  return frame_close(f, err);
}

int wire_decode_error(const uint8_t *p, size_t n, wire_error *out, ts_err *err) {
  wire_reader r;
  wire_reader_init(&r, p, n);
  memset(out, 0, sizeof *out);
  out->step_id = wire_get_u64(&r);
  out->code = wire_get_i32(&r);
  wire_get_str(&r, out->message, sizeof out->message);
  return decode_done(&r, "ERROR", err);
}

/* ---- model info, KV sizing ---- */

static int info_check(const wire_info *i, ts_err *err) {
  if (i->vocab_size <= 0 || i->max_pos < 0 || i->max_tokens < 0 || i->kv_bytes_per_token < 0 ||
      i->kv_bytes_limit < 0 ||
      i->bos_id < -1 || i->n_eos < 0 || i->n_eos > WIRE_MAX_EOS)
    return ts_errorf(err, TS_EPROTO, "bad model info (vocab %d, %d eos ids)", i->vocab_size,
                     i->n_eos);
  return 0;
}

int wire_encode_info(wire_buf *b, const wire_info *i, ts_err *err) {
  TS_TRY(info_check(i, err));
  frame_ctx f = frame_open(b, WIRE_MSG_INFO);
  wire_put_i32(b, i->vocab_size);
  wire_put_i32(b, i->max_pos);
  wire_put_i32(b, i->max_tokens);
  wire_put_u64(b, (uint64_t)i->kv_bytes_per_token);
  wire_put_u64(b, (uint64_t)i->kv_bytes_limit);
  wire_put_i32(b, i->bos_id);
  wire_put_u32(b, (uint32_t)i->n_eos);
  wire_put_i32_array(b, i->eos_ids, (size_t)i->n_eos);
  wire_put_u8(b, i->can_sample ? 1 : 0);
  return frame_close(f, err);
}

int wire_decode_info(const uint8_t *p, size_t n, wire_info *out, ts_err *err) {
  wire_reader r;
  wire_reader_init(&r, p, n);
  memset(out, 0, sizeof *out);
  out->vocab_size = wire_get_i32(&r);
  out->max_pos = wire_get_i32(&r);
  out->max_tokens = wire_get_i32(&r);
  out->kv_bytes_per_token = (int64_t)wire_get_u64(&r);
  out->kv_bytes_limit = (int64_t)wire_get_u64(&r);
  out->bos_id = wire_get_i32(&r);
  uint32_t ne = wire_get_u32(&r);
  if (r.failed || ne > WIRE_MAX_EOS) return ts_errorf(err, TS_EPROTO, "INFO header malformed");
  out->n_eos = (int32_t)ne;
  wire_get_i32_array(&r, out->eos_ids, ne);
  uint8_t cs = wire_get_u8(&r);
  if (cs > 1) return ts_errorf(err, TS_EPROTO, "INFO has a bad can_sample flag %u", cs);
  out->can_sample = cs;
  TS_TRY(decode_done(&r, "INFO", err));
  return info_check(out, err);
}

int wire_encode_init_kv(wire_buf *b, const wire_init_kv *k, ts_err *err) {
  if (k->block_size <= 0 || k->kv_cache_bytes < 0 || k->n_blocks < 0)
    return ts_errorf(err, TS_EINVAL, "bad KV sizing (block %d, %lld bytes, %d blocks)",
                     k->block_size, (long long)k->kv_cache_bytes, k->n_blocks);
  frame_ctx f = frame_open(b, WIRE_MSG_INIT_KV);
  wire_put_i32(b, k->block_size);
  wire_put_u64(b, (uint64_t)k->kv_cache_bytes);
  wire_put_i32(b, k->n_blocks);
  return frame_close(f, err);
}

int wire_decode_init_kv(const uint8_t *p, size_t n, wire_init_kv *out, ts_err *err) {
  wire_reader r;
  wire_reader_init(&r, p, n);
  out->block_size = wire_get_i32(&r);
  out->kv_cache_bytes = (int64_t)wire_get_u64(&r);
  out->n_blocks = wire_get_i32(&r);
  TS_TRY(decode_done(&r, "INIT_KV", err));
  if (out->block_size <= 0 || out->kv_cache_bytes < 0 || out->n_blocks < 0)
    return ts_errorf(err, TS_EPROTO, "INIT_KV values out of range");
  return 0;
}

/* ---- sockets ---- */

void wire_frame_free(wire_frame *f) {
  free(f->payload);
  memset(f, 0, sizeof *f);
}

int wire_send(int fd, const wire_buf *b, int64_t deadline_ms, ts_err *err) {
  if (b->failed) return ts_errorf(err, TS_ENOMEM, "frame was not encoded (out of memory)");
  return net_send_all(fd, b->data, b->len, deadline_ms, err);
}

int wire_recv_frame(int fd, wire_frame *f, size_t max_payload, int64_t deadline_ms,
                    ts_err *err) {
  uint8_t hdr[WIRE_HEADER_SIZE];
  TS_TRY(net_recv_all(fd, hdr, sizeof hdr, deadline_ms, err));
  wire_header h;
  TS_TRY(wire_header_decode(hdr, sizeof hdr, max_payload, &h, err));
  if (h.length > f->cap) {
    uint8_t *p = realloc(f->payload, h.length);
    if (!p) return ts_errorf(err, TS_ENOMEM, "out of memory for a %u-byte frame", h.length);
    f->payload = p;
    f->cap = h.length;
  }
  f->type = h.type;
  f->len = h.length;
  if (h.length) TS_TRY(net_recv_all(fd, f->payload, h.length, deadline_ms, err));
  return 0;
}

/* ---- handshake ---- */

int wire_secret_equal(const uint8_t a[WIRE_SECRET_LEN], const uint8_t b[WIRE_SECRET_LEN]) {
  /* Constant time: the loop never exits early, so timing does not leak the matching prefix. */
  volatile uint8_t diff = 0;
  for (int i = 0; i < WIRE_SECRET_LEN; i++) diff = (uint8_t)(diff | (a[i] ^ b[i]));
  return diff == 0;
}

int wire_secret_random(uint8_t out[WIRE_SECRET_LEN], ts_err *err) {
  size_t got = 0;
  while (got < WIRE_SECRET_LEN) {
    ssize_t k = getrandom(out + got, WIRE_SECRET_LEN - got, 0);
    if (k < 0) {
      if (errno == EINTR) continue;
      return ts_errorf(err, TS_EIO, "getrandom: %s", strerror(errno));
    }
    got += (size_t)k;
  }
  return 0;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

int wire_secret_from_hex(const char *hex, uint8_t out[WIRE_SECRET_LEN], ts_err *err) {
  if (!hex || strlen(hex) != 2 * WIRE_SECRET_LEN)
    return ts_errorf(err, TS_EINVAL, "secret must be %d hex digits", 2 * WIRE_SECRET_LEN);
  for (int i = 0; i < WIRE_SECRET_LEN; i++) {
    int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return ts_errorf(err, TS_EINVAL, "secret has a non-hex digit");
    out[i] = (uint8_t)(hi * 16 + lo);
  }
  return 0;
}

void wire_secret_to_hex(const uint8_t s[WIRE_SECRET_LEN], char out[2 * WIRE_SECRET_LEN + 1]) {
  static const char digits[] = "0123456789abcdef";
  for (int i = 0; i < WIRE_SECRET_LEN; i++) {
    out[2 * i] = digits[s[i] >> 4];
    out[2 * i + 1] = digits[s[i] & 15];
  }
  out[2 * WIRE_SECRET_LEN] = '\0';
}

int wire_hello_verify(const wire_hello *local, const wire_hello *peer, char *reason,
                      size_t reason_len) {
  /* The secret first, so nothing else about the launch is disclosed to a stranger's probing. */
  if (!wire_secret_equal(local->secret, peer->secret))
    snprintf(reason, reason_len, "wrong launch secret");
  else if (peer->group_id != local->group_id)
    snprintf(reason, reason_len, "group id %016llx, expected %016llx",
             (unsigned long long)peer->group_id, (unsigned long long)local->group_id);
  else if (peer->fingerprint != local->fingerprint)
    snprintf(reason, reason_len, "model fingerprint %016llx, expected %016llx",
             (unsigned long long)peer->fingerprint, (unsigned long long)local->fingerprint);
  else if (peer->world_size != local->world_size)
    snprintf(reason, reason_len, "world size %d, expected %d", peer->world_size,
             local->world_size);
  else if (peer->rank < 0 || peer->rank >= local->world_size)
    snprintf(reason, reason_len, "rank %d outside a world of %d", peer->rank, local->world_size);
  else
    return 0;
  return TS_EPROTO;
}

static void peer_name(int fd, char *out, size_t len) {
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  if (getpeername(fd, (struct sockaddr *)&ss, &sl) != 0) {
    snprintf(out, len, "an unknown peer");
    return;
  }
  if (ss.ss_family != AF_INET && ss.ss_family != AF_INET6) {
    snprintf(out, len, "a local socket");
    return;
  }
  char host[NET_HOST_MAX] = "?";
  int v6 = ss.ss_family == AF_INET6;
  const void *a = v6 ? (const void *)&((struct sockaddr_in6 *)&ss)->sin6_addr
                     : (const void *)&((struct sockaddr_in *)&ss)->sin_addr;
  int port = ntohs(v6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                      : ((struct sockaddr_in *)&ss)->sin_port);
  inet_ntop(ss.ss_family, a, host, sizeof host);
  snprintf(out, len, v6 ? "[%s]:%d" : "%s:%d", host, port);
}

static int64_t min_deadline(int64_t deadline_ms, int grace_ms) {
  int64_t soon = net_now_ms() + grace_ms;
  return soon < deadline_ms ? soon : deadline_ms;
}

/* Hello frames are small: a peer announcing more is not a tessera peer. */
#define HELLO_MAX_PAYLOAD 4096

int wire_handshake_accept(int fd, const wire_hello *local, wire_hello *peer, int64_t deadline_ms,
                          ts_err *err) {
  char who[NET_HOST_MAX + 16];
  peer_name(fd, who, sizeof who);
  ts_err e = {0};
  wire_frame f = {0};
  wire_hello_ack ack;
  memset(&ack, 0, sizeof ack);
  ack.hello = *local;
  int rc = wire_recv_frame(fd, &f, HELLO_MAX_PAYLOAD, deadline_ms, &e);
  if (rc == 0 && f.type != WIRE_MSG_HELLO)
    rc = ts_errorf(&e, TS_EPROTO, "expected HELLO, got %s", wire_msg_name(f.type));
  if (rc == 0) rc = wire_decode_hello(f.payload, f.len, peer, &e);
  if (rc == 0) {
    rc = wire_hello_verify(local, peer, ack.reason, sizeof ack.reason);
    if (rc < 0) ts_errorf(&e, rc, "%s", ack.reason);
  }
  wire_frame_free(&f);
  if (rc < 0) {
    /* Tell a peer that reached us why it was turned away, but never our secret. */
    snprintf(ack.reason, sizeof ack.reason, "%.200s", e.msg);
    memset(ack.hello.secret, 0, sizeof ack.hello.secret);
  }
  ack.status = rc;
  wire_buf b;
  wire_buf_init(&b);
  int src = wire_encode_hello_ack(&b, &ack, NULL);
  /* A rejected peer gets a short grace to read the answer; it may not be listening at all. */
  if (src == 0) src = wire_send(fd, &b, rc < 0 ? min_deadline(deadline_ms, 200) : deadline_ms, NULL);
  wire_buf_free(&b);
  if (rc < 0) {
    LOG_W("rejected connection from %s: %s", who, e.msg);
    ts_errorf(err, rc, "%s", e.msg);
    return ts_err_prefix(err, "handshake with %s", who);
  }
  if (src < 0) return ts_errorf(err, TS_ENET, "handshake with %s: could not send HELLO_ACK", who);
  return 0;
}

int wire_handshake_connect(int fd, const wire_hello *local, wire_hello *peer,
                           int64_t deadline_ms, ts_err *err) {
  char who[NET_HOST_MAX + 16];
  peer_name(fd, who, sizeof who);
  wire_buf b;
  wire_buf_init(&b);
  int rc = wire_encode_hello(&b, local, err);
  if (rc == 0) rc = wire_send(fd, &b, deadline_ms, err);
  wire_buf_free(&b);
  wire_frame f = {0};
  if (rc == 0) rc = wire_recv_frame(fd, &f, HELLO_MAX_PAYLOAD + WIRE_REASON_MAX, deadline_ms, err);
  if (rc == 0 && f.type != WIRE_MSG_HELLO_ACK)
    rc = ts_errorf(err, TS_EPROTO, "expected HELLO_ACK, got %s", wire_msg_name(f.type));
  wire_hello_ack ack;
  if (rc == 0) rc = wire_decode_hello_ack(f.payload, f.len, &ack, err);
  wire_frame_free(&f);
  if (rc == 0 && ack.status != 0)
    rc = ts_errorf(err, TS_EPROTO, "peer refused us: %s", ack.reason);
  if (rc == 0) {
    char reason[WIRE_REASON_MAX];
    rc = wire_hello_verify(local, &ack.hello, reason, sizeof reason);
    if (rc < 0) {
      ts_errorf(err, rc, "%s", reason);
      LOG_W("dropped connection to %s: %s", who, reason);
    }
  }
  if (rc < 0) return ts_err_prefix(err, "handshake with %s", who);
  *peer = ack.hello;
  return 0;
}
