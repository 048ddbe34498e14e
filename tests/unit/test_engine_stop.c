/* Stop strings over streamed text: random texts cut into random pieces (so stop strings straddle
 * piece boundaries) must emit exactly the text up to the first completed stop string (plus the stop string
 * when include_stop_str_in_output), never emit text that later turns out to be part of a stop
 * string, and emit everything when no stop string occurs. The reference is a plain search over the
 * whole text. */
#include <string.h>
#include <unistd.h>

#include "engine/request.h"
#include "test_util.h"

static void one_case(test_rng *r) {
  const char alpha[] = "ab c\xc3\xa9"; /* includes a 2-byte UTF-8 char */
  char text[300];
  int n = 0, len = 1 + (int)(test_rng_next(r) % 120);
  while (n < len) {
    int k = (int)(test_rng_next(r) % 5);
    if (k == 4) {
      text[n++] = alpha[4];
      text[n++] = alpha[5];
    } else {
      text[n++] = alpha[k];
    }
  }
  text[n] = 0;
  int n_stop = 1 + (int)(test_rng_next(r) % 3);
  char stops[3][8];
  char *stop_ptrs[3];
  size_t stop_len[3];
  size_t max_len = 0;
  for (int i = 0; i < n_stop; i++) {
    int sl = 1 + (int)(test_rng_next(r) % 4);
    /* Often a substring of the text, so that it is found. */
    if (test_rng_next(r) % 2 && n > sl) {
      int at = (int)(test_rng_next(r) % (uint64_t)(n - sl));
      memcpy(stops[i], text + at, (size_t)sl);
    } else {
      for (int j = 0; j < sl; j++) stops[i][j] = alpha[test_rng_next(r) % 4];
    }
    stops[i][sl] = 0;
    stop_ptrs[i] = stops[i];
    stop_len[i] = (size_t)sl;
    if ((size_t)sl > max_len) max_len = (size_t)sl;
  }
  int include = (int)(test_rng_next(r) % 2);
  /* Reference: the stop string completed first (smallest end, then smallest start). */
  size_t best = (size_t)-1, best_len = 0, best_end = (size_t)-1;
  for (int i = 0; i < n_stop; i++) {
    char *h = strstr(text, stops[i]);
    if (!h) continue;
    size_t at = (size_t)(h - text), end = at + stop_len[i];
    if (end < best_end || (end == best_end && at < best)) {
      best = at;
      best_len = stop_len[i];
      best_end = end;
    }
  }
  size_t expect_len = best == (size_t)-1 ? (size_t)n : best + (include ? best_len : 0);

  engine_req req;
  memset(&req, 0, sizeof req);
  req.p.n_stop = n_stop;
  req.p.include_stop_str_in_output = include;
  req.stop = stop_ptrs;
  req.stop_len = stop_len;
  req.max_stop_len = max_len;
  engine_seq s;
  memset(&s, 0, sizeof s);
  s.req = &req;
  char got[400];
  size_t got_len = 0, pos = 0;
  int stopped = 0;
  while (pos < (size_t)n && !stopped) {
    size_t piece = 1 + test_rng_next(r) % 6;
    if (pos + piece > (size_t)n) piece = (size_t)n - pos;
    /* Pieces hold whole characters, as tok_stream gives them. */
    while (pos + piece < (size_t)n && ((unsigned char)text[pos + piece] & 0xc0) == 0x80) piece++;
    int last = pos + piece == (size_t)n;
    s.out_len = 0;
    stopped = seq_text_push(&s, text + pos, piece, last);
    memcpy(got + got_len, s.out, s.out_len);
    got_len += s.out_len;
    pos += piece;
    /* What was emitted is always a prefix of the final answer. */
    CHECK(got_len <= expect_len && !memcmp(got, text, got_len));
    if (stopped) CHECK(best != (size_t)-1 && pos >= best + best_len);
  }
  CHECK_MSG(got_len == expect_len && !memcmp(got, text, got_len), "text '%s' stop '%s' got %zu want %zu",
            text, stops[0], got_len, expect_len);
  CHECK(stopped == (best != (size_t)-1));
  free(s.held);
  free(s.out);
}

int main(void) {
  const char *env = getenv("TESSERA_TEST_SEED");
  test_rng r = {env ? strtoull(env, NULL, 0) : (uint64_t)getpid() * 0x9e3779b97f4a7c15ull + 7};
  fprintf(stderr, "seed %llu\n", (unsigned long long)r.s);
  for (int i = 0; i < 20000; i++) one_case(&r);
  return test_finish("test_engine_stop");
}
