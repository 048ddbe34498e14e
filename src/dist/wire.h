/* The driver<->worker wire protocol: versioned binary frames over TCP.
 *
 * A frame is a 12-byte header then the payload, all little-endian:
 *   u32 magic "TSWR" | u16 version | u16 type | u32 payload length (<= a max frame size)
 * Message payloads are fixed-width little-endian fields; arrays are a u32 count then elements.
 * Encoders append a whole frame to a wire_buf; decoders take one frame's payload, check every
 * read against its bounds and every count against the payload, and reject trailing bytes. They
 * are pure functions over buffers (fuzzed by fuzz/fuzz_wire.c); wire_send/wire_recv_frame move
 * whole frames over a socket with a deadline.
 *
 * Handshake: the connecting side sends HELLO (model fingerprint, per-launch secret, group id,
 * rank/world), the accepting side checks it (secret compared in constant time) and answers
 * HELLO_ACK with a status, a reason and its own HELLO; either side drops a connection that fails
 * and logs why. The secret keeps stray or stale connections out of a launch; it is not
 * cryptographic authentication (both sides send it in the clear). */
#ifndef TESSERA_WIRE_H
#define TESSERA_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/batch.h"
#include "util/status.h"
#include "util/tensor.h"

#define WIRE_MAGIC 0x52575354u /* "TSWR" as little-endian bytes */
#define WIRE_VERSION 2
#define WIRE_HEADER_SIZE 12
#define WIRE_MAX_FRAME ((size_t)1 << 30) /* default payload limit: 1 GiB */
#define WIRE_SECRET_LEN 32
#define WIRE_HOST_MAX 256
#define WIRE_REASON_MAX 256
#define WIRE_MAX_PEERS 4096
#define WIRE_MAX_EOS 32

typedef enum {
  WIRE_MSG_HELLO = 1,
  WIRE_MSG_HELLO_ACK,
  WIRE_MSG_PEERS,    /* rendezvous: where every rank of a comm group listens */
  WIRE_MSG_STEP,     /* driver -> worker: a step plan */
  WIRE_MSG_RESULT,   /* worker -> driver: sampled ids or logits rows */
  WIRE_MSG_HIDDEN,   /* pipeline stage -> next stage: hidden states */
  WIRE_MSG_PING,
  WIRE_MSG_PONG,
  WIRE_MSG_SHUTDOWN,
  WIRE_MSG_ERROR,    /* a step or request failed on the sender */
  WIRE_MSG_INFO,     /* worker -> driver: what the engine must know about the model */
  WIRE_MSG_INIT_KV,  /* driver -> worker: size the paged KV cache; the worker answers in kind */
  WIRE_MSG_END_      /* one past the last type */
} wire_msg_type;

const char *wire_msg_name(int type);

/* ---- encoding helpers ---- */

/* Growable output buffer; an allocation failure is sticky (failed) and reported at frame end. */
typedef struct {
  uint8_t *data;
  size_t len, cap;
  int failed;
} wire_buf;

void wire_buf_init(wire_buf *b);
void wire_buf_free(wire_buf *b);
void wire_buf_reset(wire_buf *b); /* len = 0, keeps the memory */
void wire_put_u8(wire_buf *b, uint8_t v);
void wire_put_u16(wire_buf *b, uint16_t v);
void wire_put_u32(wire_buf *b, uint32_t v);
void wire_put_u64(wire_buf *b, uint64_t v);
void wire_put_i32(wire_buf *b, int32_t v);
void wire_put_f32(wire_buf *b, float v);
void wire_put_bytes(wire_buf *b, const void *p, size_t n);
void wire_put_str(wire_buf *b, const char *s); /* u32 length + bytes, no terminator */
void wire_put_i32_array(wire_buf *b, const int32_t *v, size_t n); /* elements only */
void wire_put_f32_array(wire_buf *b, const float *v, size_t n);

/* Bounds-checked reader; any overrun sets failed and later reads return zeros. */
typedef struct {
  const uint8_t *p;
  size_t len, off;
  int failed;
} wire_reader;

void wire_reader_init(wire_reader *r, const void *p, size_t len);
uint8_t wire_get_u8(wire_reader *r);
uint16_t wire_get_u16(wire_reader *r);
uint32_t wire_get_u32(wire_reader *r);
uint64_t wire_get_u64(wire_reader *r);
int32_t wire_get_i32(wire_reader *r);
float wire_get_f32(wire_reader *r);
const uint8_t *wire_get_bytes(wire_reader *r, size_t n); /* NULL on overrun */
/* u32 length + bytes into out (NUL-terminated); fails when it does not fit in cap. */
void wire_get_str(wire_reader *r, char *out, size_t cap);
void wire_get_i32_array(wire_reader *r, int32_t *out, size_t n);
void wire_get_f32_array(wire_reader *r, float *out, size_t n);
static inline size_t wire_reader_left(const wire_reader *r) { return r->len - r->off; }

/* ---- frames ---- */

typedef struct {
  uint16_t version;
  uint16_t type;
  uint32_t length; /* payload bytes */
} wire_header;

/* Checks magic, version, a known type and length <= max_payload. */
int wire_header_decode(const uint8_t *p, size_t n, size_t max_payload, wire_header *h,
                       ts_err *err);

/* ---- messages ---- */

typedef enum { WIRE_ROLE_DRIVER = 0, WIRE_ROLE_WORKER = 1, WIRE_ROLE_PEER = 2 } wire_role;

typedef struct {
  uint8_t role;            /* wire_role */
  uint64_t fingerprint;    /* model fingerprint: both ends must serve the same weights */
  uint64_t group_id;       /* this launch's group; stale or foreign connections differ */
  uint8_t secret[WIRE_SECRET_LEN];
  int32_t rank, world_size;
  int32_t tp_rank, tp_size, pp_rank, pp_size;
  int32_t port;            /* where the sender listens for peers (rendezvous), 0 if nowhere */
  char host[WIRE_HOST_MAX];
} wire_hello;

typedef struct {
  int32_t status;          /* 0: accepted; else a ts_status */
  char reason[WIRE_REASON_MAX];
  wire_hello hello;        /* the acceptor's own hello */
} wire_hello_ack;

typedef struct {
  char host[WIRE_HOST_MAX];
  int32_t port;
} wire_peer;

typedef struct {
  int n;
  wire_peer *peers; /* [n], owned */
} wire_peers;

enum { WIRE_STEP_SAMPLE = 1 }; /* step flags: return sampled ids rather than logits rows */

/* A step plan. After wire_decode_step, batch's arrays (and rows with their penalty arrays)
 * point into memory owned by the step. With WIRE_STEP_SAMPLE the plan carries how to sample
 * each logits row on the worker's device (rows [batch.n_logits]); otherwise rows is NULL. */
typedef struct {
  uint64_t step_id;
  uint32_t flags;
  ts_batch batch;
  ts_sample_row *rows;
  void *mem_;
} wire_step;

typedef enum { WIRE_RESULT_TOKENS = 0, WIRE_RESULT_LOGITS = 1 } wire_result_kind;

typedef struct {
  uint64_t step_id;
  int32_t kind;       /* wire_result_kind */
  int32_t n_rows;
  int32_t vocab;      /* LOGITS only */
  int32_t *tokens;    /* TOKENS: [n_rows] sampled ids */
  float *logprobs;    /* TOKENS: [n_rows] or NULL */
  float *logits;      /* LOGITS: [n_rows][vocab] */
  void *mem_;
} wire_result;

typedef struct {
  uint64_t step_id;
  int32_t n_tokens;
  int32_t dim;
  int32_t dtype;      /* TS_F32, TS_F16 or TS_BF16; elements little-endian */
  void *data;         /* [n_tokens][dim] */
  void *mem_;
} wire_hidden;

typedef struct {
  uint64_t seq;
  uint64_t time_ms;
  int32_t status;     /* PONG: 0 healthy, else the worker's ts_status */
} wire_ping;

typedef struct {
  uint64_t step_id;   /* 0 when not about a step */
  int32_t code;
  char message[TS_ERR_MSG_MAX];
} wire_error;

typedef struct {
  int32_t vocab_size;
  int32_t max_pos;             /* longest context the model supports */
  int32_t max_tokens;          /* most tokens one step may carry */
  int64_t kv_bytes_per_token;  /* on this worker */
  int64_t kv_bytes_limit;      /* KV bytes this worker's GPU has room for; 0: no device limit */
  int32_t bos_id;              /* -1 when none */
  int32_t n_eos;
  int32_t eos_ids[WIRE_MAX_EOS];
  int32_t can_sample;          /* 1: the worker can sample on its device (WIRE_STEP_SAMPLE) */
} wire_info;

typedef struct {
  int32_t block_size;          /* tokens per KV block */
  int64_t kv_cache_bytes;      /* budget per worker */
  int32_t n_blocks;            /* request: exact count when > 0; answer: blocks allocated */
} wire_init_kv;

/* Encoders append one whole frame to b. */
int wire_encode_hello(wire_buf *b, const wire_hello *h, ts_err *err);
int wire_encode_hello_ack(wire_buf *b, const wire_hello_ack *a, ts_err *err);
int wire_encode_peers(wire_buf *b, const wire_peers *p, ts_err *err);
/* rows [batch->n_logits] is required with WIRE_STEP_SAMPLE in flags and ignored without. */
int wire_encode_step(wire_buf *b, uint64_t step_id, uint32_t flags, const ts_batch *batch,
                     const ts_sample_row *rows, ts_err *err);
int wire_encode_result(wire_buf *b, const wire_result *r, ts_err *err);
int wire_encode_hidden(wire_buf *b, const wire_hidden *h, ts_err *err);
int wire_encode_ping(wire_buf *b, int type, const wire_ping *p, ts_err *err); /* PING or PONG */
int wire_encode_shutdown(wire_buf *b, const char *reason, ts_err *err);
int wire_encode_error(wire_buf *b, const wire_error *e, ts_err *err);
int wire_encode_info(wire_buf *b, const wire_info *i, ts_err *err);
int wire_encode_init_kv(wire_buf *b, const wire_init_kv *k, ts_err *err);

/* Decoders take one frame's payload. Those with arrays allocate; free with the paired _free
 * (safe on a zeroed or failed-decode struct). */
int wire_decode_hello(const uint8_t *p, size_t n, wire_hello *out, ts_err *err);
int wire_decode_hello_ack(const uint8_t *p, size_t n, wire_hello_ack *out, ts_err *err);
int wire_decode_peers(const uint8_t *p, size_t n, wire_peers *out, ts_err *err);
void wire_peers_free(wire_peers *p);
int wire_decode_step(const uint8_t *p, size_t n, wire_step *out, ts_err *err);
void wire_step_free(wire_step *s);
int wire_decode_result(const uint8_t *p, size_t n, wire_result *out, ts_err *err);
void wire_result_free(wire_result *r);
int wire_decode_hidden(const uint8_t *p, size_t n, wire_hidden *out, ts_err *err);
void wire_hidden_free(wire_hidden *h);
int wire_decode_ping(const uint8_t *p, size_t n, wire_ping *out, ts_err *err);
int wire_decode_shutdown(const uint8_t *p, size_t n, char *reason, size_t cap, ts_err *err);
int wire_decode_error(const uint8_t *p, size_t n, wire_error *out, ts_err *err);
int wire_decode_info(const uint8_t *p, size_t n, wire_info *out, ts_err *err);
int wire_decode_init_kv(const uint8_t *p, size_t n, wire_init_kv *out, ts_err *err);

/* Structural checks a worker relies on before it touches a batch: counts >= 0, seq_start
 * non-decreasing from 0 to n_tokens, logits rows in range, positions and lengths >= 0. */
int wire_batch_validate(const ts_batch *b, ts_err *err);

/* ---- sockets ---- */

/* A received frame; payload is reused across calls. */
typedef struct {
  int type;
  uint8_t *payload;
  size_t len, cap;
} wire_frame;

void wire_frame_free(wire_frame *f);
int wire_send(int fd, const wire_buf *b, int64_t deadline_ms, ts_err *err);
/* Receives one whole frame (max_payload 0: WIRE_MAX_FRAME) before the deadline. */
int wire_recv_frame(int fd, wire_frame *f, size_t max_payload, int64_t deadline_ms, ts_err *err);

/* ---- handshake ---- */

int wire_secret_equal(const uint8_t a[WIRE_SECRET_LEN], const uint8_t b[WIRE_SECRET_LEN]);
int wire_secret_random(uint8_t out[WIRE_SECRET_LEN], ts_err *err);
int wire_secret_from_hex(const char *hex, uint8_t out[WIRE_SECRET_LEN], ts_err *err);
void wire_secret_to_hex(const uint8_t s[WIRE_SECRET_LEN], char out[2 * WIRE_SECRET_LEN + 1]);

/* Does peer belong to local's launch? Same secret, fingerprint, group and world size, and a rank
 * inside the world. Fills reason (one line) and returns TS_EPROTO when not. */
int wire_hello_verify(const wire_hello *local, const wire_hello *peer, char *reason,
                      size_t reason_len);
/* Accepting side: receive HELLO, verify, answer HELLO_ACK. A peer that fails is told why (when
 * it can still hear) and the reason is logged; the caller closes the socket. */
int wire_handshake_accept(int fd, const wire_hello *local, wire_hello *peer, int64_t deadline_ms,
                          ts_err *err);
/* Connecting side: send HELLO, wait for HELLO_ACK, and verify the acceptor's hello too. */
int wire_handshake_connect(int fd, const wire_hello *local, wire_hello *peer,
                           int64_t deadline_ms, ts_err *err);

#endif
