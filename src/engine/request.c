/* Requests: deep copies of the caller's parameters, per-choice sequences, and the stop-string
 * hold-back logic over detokenized text. */
#include "engine/request.h"

#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

#define REQ_MAX_N 256
#define REQ_MAX_STOP 64

static int buf_reserve(char **buf, size_t *cap, size_t need) {
  if (need <= *cap) return 0;
  size_t nc = *cap ? *cap : 64;
  while (nc < need) nc *= 2;
  char *nb = realloc(*buf, nc);
  if (!nb) return TS_ENOMEM;
  *buf = nb;
  *cap = nc;
  return 0;
}

void req_free(engine_req *r) {
  if (!r) return;
  if (r->seqs) {
    for (int i = 0; i < r->n; i++) {
      engine_seq *s = &r->seqs[i];
      free(s->tokens);
      block_table_free(&s->bt);
      sampler_free(s->smp);
      if (s->ts) tok_stream_free(s->ts);
      free(s->held);
      free(s->out);
    }
    free(r->seqs);
  }
  if (r->stop)
    for (int i = 0; i < r->p.n_stop; i++) free(r->stop[i]);
  free(r->stop);
  free(r->stop_len);
  free(r->prompt_tail);
  free(r->stop_ids);
  free(r->bias_ids);
  free(r->bias);
  free(r->prompt);
  free(r->plp);
  free(r);
}

static uint64_t req_mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/* How many prompt tokens to feed the detokenizer before the output: the shortest suffix of at least
 * 4 tokens (up to 23) that decodes without a replacement character, so that it starts on a
 * character boundary; the whole prompt when it is short or none qualifies. */
static size_t stream_prime_len(const tokenizer *tok, const int32_t *prompt, size_t n, int skip) {
  if (n <= 4) return n;
  for (size_t i = 4; i <= n && i < 24; i++) {
    char *text = NULL;
    size_t len = 0;
    if (tok_decode(tok, prompt + n - i, i, skip, &text, &len, NULL) < 0) continue;
    int bad = memmem(text, len, "\xef\xbf\xbd", 3) != NULL;
    free(text);
    if (!bad) return i;
  }
  return n;
}

int req_create(engine_req **out, uint64_t id, const int32_t *prompt, size_t n_prompt,
               const engine_request_params *p, int vocab_size, int cap_tokens,
               uint64_t engine_seed, const tokenizer *tok, engine_event_fn fn, void *user,
               ts_err *err) {
  *out = NULL;
  if (!p) return ts_errorf(err, TS_EINVAL, "request: no parameters");
  if (n_prompt == 0) return ts_errorf(err, TS_EINVAL, "request: the prompt is empty");
  if (p->n < 1 || p->n > REQ_MAX_N)
    return ts_errorf(err, TS_ERANGE, "request: n = %d, must be in [1, %d]", p->n, REQ_MAX_N);
  if (p->n_stop < 0 || p->n_stop > REQ_MAX_STOP || (p->n_stop > 0 && !p->stop))
    return ts_errorf(err, TS_EINVAL, "request: at most %d stop strings", REQ_MAX_STOP);
  if (p->n_stop > 0 && !tok)
    return ts_errorf(err, TS_EUNSUPPORTED, "request: stop strings need a tokenizer");
  if (p->n_stop_token_ids < 0 || (p->n_stop_token_ids > 0 && !p->stop_token_ids))
    return ts_errorf(err, TS_EINVAL, "request: bad stop_token_ids");
  const sampling_params *sp = &p->sampling;
  if (sp->n_logit_bias < 0 || (sp->n_logit_bias > 0 && (!sp->logit_bias_ids || !sp->logit_bias)))
    return ts_errorf(err, TS_EINVAL, "request: bad logit_bias");
  for (size_t i = 0; i < n_prompt; i++)
    if (prompt[i] < 0 || prompt[i] >= vocab_size)
      return ts_errorf(err, TS_ERANGE, "request: prompt token %d at %zu is outside the vocabulary of %d",
                       prompt[i], i, vocab_size);
  for (int i = 0; i < p->n_stop_token_ids; i++)
    if (p->stop_token_ids[i] < 0 || p->stop_token_ids[i] >= vocab_size)
      return ts_errorf(err, TS_ERANGE, "request: stop token id %d is outside the vocabulary of %d",
                       p->stop_token_ids[i], vocab_size);
  for (int i = 0; i < p->n_stop; i++)
    if (!p->stop[i] || !p->stop[i][0])
      return ts_errorf(err, TS_EINVAL, "request: stop string %d is empty", i);
  if (p->has_prompt_logprobs &&
      (p->prompt_logprobs < 0 || p->prompt_logprobs > SAMPLING_MAX_LOGPROBS))
    return ts_errorf(err, TS_ERANGE, "request: prompt_logprobs %d is outside [0, %d]",
                     p->prompt_logprobs, SAMPLING_MAX_LOGPROBS);

  engine_req *r = calloc(1, sizeof *r);
  if (!r) return ts_errorf(err, TS_ENOMEM, "request: out of memory");
  r->id = id;
  r->fn = fn;
  r->user = user;
  r->p = *p;
  r->n = p->n;
  r->n_prompt = (int)n_prompt;
  r->n_unfinished = p->n;
  r->prompt = malloc(n_prompt * sizeof *r->prompt);
  r->seqs = calloc((size_t)p->n, sizeof *r->seqs);
  if (!r->prompt || !r->seqs) goto oom;
  memcpy(r->prompt, prompt, n_prompt * sizeof *prompt);
  if (p->has_prompt_logprobs) {
    if (!(r->plp = calloc(n_prompt, sizeof *r->plp))) goto oom;
    r->plp[0].token = prompt[0];
  }
  if (p->n_stop > 0) {
    r->stop = calloc((size_t)p->n_stop, sizeof *r->stop);
    r->stop_len = calloc((size_t)p->n_stop, sizeof *r->stop_len);
    if (!r->stop || !r->stop_len) goto oom;
    for (int i = 0; i < p->n_stop; i++) {
      r->stop[i] = strdup(p->stop[i]);
      if (!r->stop[i]) goto oom;
      r->stop_len[i] = strlen(p->stop[i]);
      if (r->stop_len[i] > r->max_stop_len) r->max_stop_len = r->stop_len[i];
    }
  }
  r->p.stop = (const char *const *)r->stop;
  if (p->n_stop_token_ids > 0) {
    r->stop_ids = malloc((size_t)p->n_stop_token_ids * sizeof *r->stop_ids);
    if (!r->stop_ids) goto oom;
    memcpy(r->stop_ids, p->stop_token_ids, (size_t)p->n_stop_token_ids * sizeof *r->stop_ids);
  }
  r->p.stop_token_ids = r->stop_ids;
  if (sp->n_logit_bias > 0) {
    r->bias_ids = malloc((size_t)sp->n_logit_bias * sizeof *r->bias_ids);
    r->bias = malloc((size_t)sp->n_logit_bias * sizeof *r->bias);
    if (!r->bias_ids || !r->bias) goto oom;
    memcpy(r->bias_ids, sp->logit_bias_ids, (size_t)sp->n_logit_bias * sizeof *r->bias_ids);
    memcpy(r->bias, sp->logit_bias, (size_t)sp->n_logit_bias * sizeof *r->bias);
  }
  r->p.sampling.logit_bias_ids = r->bias_ids;
  r->p.sampling.logit_bias = r->bias;

  if (cap_tokens < (int)n_prompt + 1) cap_tokens = (int)n_prompt + 1;
  size_t prime = tok ? stream_prime_len(tok, prompt, n_prompt, p->skip_special_tokens) : 0;
  for (int i = 0; i < r->n; i++) {
    engine_seq *s = &r->seqs[i];
    s->req = r;
    s->index = i;
    s->state = SEQ_WAITING;
    s->logits_row = -1;
    block_table_init(&s->bt);
    s->cap = cap_tokens;
    /* Room for the prompt and a first stretch of output; long generations double it. */
    s->alloc = (int)n_prompt + 64 < cap_tokens ? (int)n_prompt + 64 : cap_tokens;
    s->tokens = malloc((size_t)s->alloc * sizeof *s->tokens);
    if (!s->tokens) goto oom;
    memcpy(s->tokens, prompt, n_prompt * sizeof *prompt);
    s->n_tokens = (int)n_prompt;
    /* Each choice samples on its own stream: the request's seed + index, so choice i of a seeded
     * request is the same whatever else runs. */
    sampling_params cp = r->p.sampling;
    uint64_t eseed = req_mix(engine_seed ^ req_mix((uint64_t)i));
    if (cp.has_seed) cp.seed = sp->seed + (uint64_t)i;
    int rc = sampler_create(&s->smp, &cp, vocab_size, eseed, err);
    if (rc < 0) {
      req_free(r);
      return ts_err_prefix(err, "request");
    }
    sampler_observe_prompt(s->smp, prompt, n_prompt);
    if (tok) {
      rc = tok_stream_create(&s->ts, tok, p->skip_special_tokens);
      if (rc < 0) {
        req_free(r);
        return ts_errorf(err, rc, "request: cannot create the incremental detokenizer");
      }
      /* The stream starts after the prompt, as vLLM's does: a generated "\u2581the" keeps its
       * space, which a stream started cold would strip as the start of the text. */
      const char *txt;
      size_t len, emitted = 0;
      for (size_t k = n_prompt - prime; k < n_prompt; k++)
        if (tok_stream_push(s->ts, prompt[k], &txt, &len) == 0) emitted += len;
      if (i == 0 && prime > 0) {
        char *whole = NULL;
        size_t whole_len = 0;
        if (tok_decode(tok, prompt + n_prompt - prime, prime, p->skip_special_tokens, &whole,
                       &whole_len, NULL) == 0 && whole_len > emitted) {
          r->prompt_tail_len = whole_len - emitted;
          r->prompt_tail = malloc(r->prompt_tail_len);
          if (r->prompt_tail) memcpy(r->prompt_tail, whole + emitted, r->prompt_tail_len);
          else r->prompt_tail_len = 0;
        }
        free(whole);
      }
    }
  }
  *out = r;
  return 0;
oom:
  req_free(r);
  return ts_errorf(err, TS_ENOMEM, "request: out of memory");
}

/* Longest suffix of buf[0..len) that is a proper prefix of some stop string. */
static size_t stop_holdback(const engine_req *r, const char *buf, size_t len) {
  size_t max = r->max_stop_len ? r->max_stop_len - 1 : 0;
  if (max > len) max = len;
  for (size_t k = max; k > 0; k--)
    for (int i = 0; i < r->p.n_stop; i++)
      if (r->stop_len[i] > k && !memcmp(buf + len - k, r->stop[i], k)) return k;
  return 0;
}

int seq_prompt_rows(const engine_seq *s, int k, int *pos0) {
  const engine_req *r = s->req;
  *pos0 = 0;
  if (!req_plp_pending(r)) return 0;
  /* Position p's logits give prompt token p + 1: the last prompt position gives none (its logits
   * sample the first generated token). Positions before plp_done are done already. */
  int lo = s->n_computed > r->plp_done ? s->n_computed : r->plp_done;
  int hi = s->n_computed + k < r->n_prompt - 1 ? s->n_computed + k : r->n_prompt - 1;
  if (hi <= lo) return 0;
  *pos0 = lo;
  return hi - lo;
}

int seq_append(engine_seq *s, int32_t t) {
  if (s->n_tokens == s->alloc) {
    int na = s->alloc * 2 < s->cap ? s->alloc * 2 : s->cap;
    if (na <= s->alloc) return TS_ERANGE;
    int32_t *nt = realloc(s->tokens, (size_t)na * sizeof *nt);
    if (!nt) return TS_ENOMEM;
    s->tokens = nt;
    s->alloc = na;
  }
  s->tokens[s->n_tokens++] = t;
  return 0;
}

void seq_skip_prompt_tail(engine_seq *s, const char **text, size_t *len) {
  const engine_req *r = s->req;
  if (s->tail_pos >= r->prompt_tail_len || !*len) return;
  size_t want = r->prompt_tail_len - s->tail_pos, m = *len < want ? *len : want;
  if (memcmp(*text, r->prompt_tail + s->tail_pos, m)) {
    /* The output merged with the held prompt bytes (one character across the boundary): keep
     * the text as the stream gives it. */
    s->tail_pos = r->prompt_tail_len;
    return;
  }
  s->tail_pos += m;
  *text += m;
  *len -= m;
}

int seq_text_push(engine_seq *s, const char *text, size_t len, int finishing) {
  engine_req *r = s->req;
  if (buf_reserve(&s->held, &s->held_cap, s->held_len + len + 1) < 0) return 0;
  if (len) memcpy(s->held + s->held_len, text, len);
  s->held_len += len;
  size_t emit = s->held_len, keep_from = s->held_len;
  int stopped = 0;
  if (r->p.n_stop > 0) {
    /* The stop string that a character-by-character stream would complete first (smallest end,
     * then smallest start), so the outcome does not depend on how text was cut into tokens. Text
     * before the held part was already checked. */
    size_t best = (size_t)-1, best_len = 0, best_end = (size_t)-1;
    for (int i = 0; i < r->p.n_stop; i++) {
      const char *hit = memmem(s->held, s->held_len, r->stop[i], r->stop_len[i]);
      if (!hit) continue;
      size_t at = (size_t)(hit - s->held), end = at + r->stop_len[i];
      if (end < best_end || (end == best_end && at < best)) {
        best = at;
        best_len = r->stop_len[i];
        best_end = end;
      }
    }
    if (best != (size_t)-1) {
      emit = best + (r->p.include_stop_str_in_output ? best_len : 0);
      stopped = 1;
    } else if (!finishing) {
      emit = s->held_len - stop_holdback(r, s->held, s->held_len);
      keep_from = emit;
    }
  }
  if (buf_reserve(&s->out, &s->out_cap, s->out_len + emit + 1) < 0) return stopped;
  memcpy(s->out + s->out_len, s->held, emit);
  s->out_len += emit;
  s->out[s->out_len] = 0;
  if (stopped || finishing) {
    s->held_len = 0;
  } else {
    memmove(s->held, s->held + keep_from, s->held_len - keep_from);
    s->held_len -= keep_from;
  }
  return stopped;
}
