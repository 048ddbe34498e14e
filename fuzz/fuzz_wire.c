/* libFuzzer target: wire frame headers and every message decoder over arbitrary bytes. A frame
 * is decoded as its header says; the bytes are also fed to the decoder the first byte picks, so
 * payload decoders see inputs that need no valid header. Decoded steps must validate, and
 * whatever decodes must re-encode. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dist/wire.h"
#include "util/log.h"

static void decode_payload(int type, const uint8_t *p, size_t n) {
  ts_err err = {0};
  wire_buf w;
  wire_buf_init(&w);
  switch (type) {
  case WIRE_MSG_HELLO: {
    wire_hello h;
    if (wire_decode_hello(p, n, &h, &err) == 0 && wire_encode_hello(&w, &h, &err) != 0) abort();
    break;
  }
  case WIRE_MSG_HELLO_ACK: {
    wire_hello_ack a;
    if (wire_decode_hello_ack(p, n, &a, &err) == 0 && wire_encode_hello_ack(&w, &a, &err) != 0)
      abort();
    break;
  }
  case WIRE_MSG_PEERS: {
    wire_peers pr;
    if (wire_decode_peers(p, n, &pr, &err) == 0) {
      if (wire_encode_peers(&w, &pr, &err) != 0) abort();
      wire_peers_free(&pr);
    }
    break;
  }
  case WIRE_MSG_STEP: {
    wire_step s;
    if (wire_decode_step(p, n, &s, &err) == 0) {
      if (wire_encode_step(&w, s.step_id, s.flags, &s.batch, s.rows, &err) != 0) abort();
      /* The re-encoded payload is the input, byte for byte. */
      if (w.len != n + WIRE_HEADER_SIZE || memcmp(w.data + WIRE_HEADER_SIZE, p, n)) abort();
      wire_step_free(&s);
    }
    break;
  }
  case WIRE_MSG_RESULT: {
    wire_result r;
    if (wire_decode_result(p, n, &r, &err) == 0) {
      if (wire_encode_result(&w, &r, &err) != 0) abort();
      wire_result_free(&r);
    }
    break;
  }
  case WIRE_MSG_HIDDEN: {
    wire_hidden h;
    if (wire_decode_hidden(p, n, &h, &err) == 0) {
      if (wire_encode_hidden(&w, &h, &err) != 0) abort();
      wire_hidden_free(&h);
    }
    break;
  }
  case WIRE_MSG_PING:
  case WIRE_MSG_PONG: {
    wire_ping pg;
    (void)wire_decode_ping(p, n, &pg, &err);
    break;
  }
  case WIRE_MSG_SHUTDOWN: {
    char reason[128];
    (void)wire_decode_shutdown(p, n, reason, sizeof reason, &err);
    break;
  }
  case WIRE_MSG_ERROR: {
    wire_error e;
    (void)wire_decode_error(p, n, &e, &err);
    break;
  }
  case WIRE_MSG_INFO: {
    wire_info i;
    if (wire_decode_info(p, n, &i, &err) == 0 && wire_encode_info(&w, &i, &err) != 0) abort();
    break;
  }
  case WIRE_MSG_INIT_KV: {
    wire_init_kv k;
    if (wire_decode_init_kv(p, n, &k, &err) == 0 && wire_encode_init_kv(&w, &k, &err) != 0)
      abort();
    break;
  }
  default:
    break;
  }
  wire_buf_free(&w);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  log_set_level(LOG_OFF);
  ts_err err = {0};
  wire_header h;
  if (wire_header_decode(data, size, 1 << 20, &h, &err) == 0 &&
      h.length <= size - WIRE_HEADER_SIZE)
    decode_payload(h.type, data + WIRE_HEADER_SIZE, h.length);
  if (size > 0) decode_payload(1 + data[0] % (WIRE_MSG_END_ - 1), data + 1, size - 1);
  return 0;
}
