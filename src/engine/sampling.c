/* The sampler: logit bias, penalties, temperature, min-p / top-k / top-p truncation and a draw
 * from a per-request xoshiro256** stream; plus logprobs. Buffers are sized at create so sampling
 * never allocates.
 *
 * Order (as vLLM applies them): logit_bias, repetition penalty (prompt + generated tokens; a
 * positive logit is divided by it, a negative one multiplied), frequency and presence penalties
 * (generated tokens), temperature, min-p, top-k, top-p. Logprobs are the log-softmax of the logits
 * after bias, penalties and temperature (temperature 1 when greedy), before truncation, so every
 * reported value is finite. */
#include "engine/sampling.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Below this temperature sampling is greedy (dividing by it would overflow). */
#define SAMPLING_GREEDY_EPS 1e-5f

struct sampler {
  sampling_params p;
  int32_t *bias_ids; /* copies of the request's logit_bias arrays */
  float *bias;
  int vocab;
  uint64_t rng[4];
  uint64_t seed;     /* what rng was seeded from: the device sampler's stream */
  uint64_t n_gen;    /* generated tokens observed: the device stream's counter */
  int32_t *count;    /* [vocab] generated-token counts */
  uint8_t *seen;     /* [vocab] bit 0: in the prompt, bit 1: generated */
  int32_t *seen_ids; /* [vocab] distinct ids with seen != 0, in first-seen order */
  int n_seen;
  int32_t *cand;     /* [vocab] candidate ids while truncating */
  float *lp;         /* [vocab] processed logits for logprobs */
};

void sampling_params_default(sampling_params *p) {
  memset(p, 0, sizeof *p);
  p->temperature = 1.0f;
  p->top_p = 1.0f;
  p->top_k = 0;
  p->min_p = 0.0f;
  p->repetition_penalty = 1.0f;
  p->logprobs = -1;
}

/* ---- xoshiro256** ---------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(uint64_t s[4]) {
  uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return r;
}

/* Uniform in [0, 1) with 53 random bits. */
static double rng_uniform(uint64_t s[4]) { return (double)(rng_next(s) >> 11) * 0x1.0p-53; }

/* ---- lifecycle ------------------------------------------------------------------------- */

int sampler_create(sampler **out, const sampling_params *p, int vocab_size, uint64_t engine_seed,
                   ts_err *err) {
  *out = NULL;
  if (vocab_size <= 0) return ts_errorf(err, TS_EINVAL, "vocab size must be positive");
  if (!(p->temperature >= 0) || !isfinite(p->temperature))
    return ts_errorf(err, TS_EINVAL, "temperature must be >= 0, got %g", p->temperature);
  if (!(p->top_p > 0 && p->top_p <= 1))
    return ts_errorf(err, TS_EINVAL, "top_p must be in (0, 1], got %g", p->top_p);
  if (p->top_k < -1) return ts_errorf(err, TS_EINVAL, "top_k must be -1, 0 or positive, got %d", p->top_k);
  if (!(p->min_p >= 0 && p->min_p <= 1))
    return ts_errorf(err, TS_EINVAL, "min_p must be in [0, 1], got %g", p->min_p);
  if (!(p->repetition_penalty > 0) || !isfinite(p->repetition_penalty))
    return ts_errorf(err, TS_EINVAL, "repetition_penalty must be > 0, got %g",
                     p->repetition_penalty);
  if (!isfinite(p->presence_penalty) || !isfinite(p->frequency_penalty))
    return ts_errorf(err, TS_EINVAL, "presence/frequency penalties must be finite");
  if (p->logprobs > SAMPLING_MAX_LOGPROBS)
    return ts_errorf(err, TS_EINVAL, "logprobs must be at most %d, got %d", SAMPLING_MAX_LOGPROBS,
                     p->logprobs);
  if (p->n_logit_bias < 0) return ts_errorf(err, TS_EINVAL, "negative logit_bias count");
  for (int i = 0; i < p->n_logit_bias; i++) {
    if (p->logit_bias_ids[i] < 0 || p->logit_bias_ids[i] >= vocab_size)
      return ts_errorf(err, TS_EINVAL, "logit_bias token id %d is outside the vocabulary of %d",
                       p->logit_bias_ids[i], vocab_size);
    if (!isfinite(p->logit_bias[i]))
      return ts_errorf(err, TS_EINVAL, "logit_bias for token %d is not finite",
                       p->logit_bias_ids[i]);
  }
  sampler *s = calloc(1, sizeof *s);
  if (!s) return ts_errorf(err, TS_ENOMEM, "out of memory creating a sampler");
  s->p = *p;
  s->vocab = vocab_size;
  size_t nb = p->n_logit_bias ? (size_t)p->n_logit_bias : 1;
  s->bias_ids = malloc(nb * sizeof *s->bias_ids);
  s->bias = malloc(nb * sizeof *s->bias);
  s->count = calloc((size_t)vocab_size, sizeof *s->count);
  s->seen = calloc((size_t)vocab_size, 1);
  s->seen_ids = malloc((size_t)vocab_size * sizeof *s->seen_ids);
  s->cand = malloc((size_t)vocab_size * sizeof *s->cand);
  s->lp = malloc((size_t)vocab_size * sizeof *s->lp);
  if (!s->bias_ids || !s->bias || !s->count || !s->seen || !s->seen_ids || !s->cand || !s->lp) {
    sampler_free(s);
    return ts_errorf(err, TS_ENOMEM, "out of memory creating a sampler for %d tokens", vocab_size);
  }
  if (p->n_logit_bias) {
    memcpy(s->bias_ids, p->logit_bias_ids, (size_t)p->n_logit_bias * sizeof *s->bias_ids);
    memcpy(s->bias, p->logit_bias, (size_t)p->n_logit_bias * sizeof *s->bias);
  }
  s->p.logit_bias_ids = s->bias_ids;
  s->p.logit_bias = s->bias;
  uint64_t x = p->has_seed ? p->seed : engine_seed;
  s->seed = x;
  for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
  *out = s;
  return 0;
}

void sampler_free(sampler *s) {
  if (!s) return;
  free(s->bias_ids);
  free(s->bias);
  free(s->count);
  free(s->seen);
  free(s->seen_ids);
  free(s->cand);
  free(s->lp);
  free(s);
}

static void mark_seen(sampler *s, int32_t id, uint8_t bit) {
  if (id < 0 || id >= s->vocab) return;
  if (!s->seen[id]) s->seen_ids[s->n_seen++] = id;
  s->seen[id] |= bit;
}

void sampler_observe_prompt(sampler *s, const int32_t *ids, size_t n) {
  for (size_t i = 0; i < n; i++) mark_seen(s, ids[i], 1);
}

void sampler_observe(sampler *s, int32_t id) {
  if (id < 0 || id >= s->vocab) return;
  mark_seen(s, id, 2);
  s->count[id]++;
  s->n_gen++;
}

int sampler_device_row(sampler *s, ts_sample_row *row) {
  const sampling_params *p = &s->p;
  if (p->n_logit_bias > 0 || p->logprobs >= 0) return 0;
  memset(row, 0, sizeof *row);
  row->temperature = p->temperature;
  row->top_p = p->top_p;
  row->min_p = p->min_p;
  row->top_k = p->top_k;
  row->presence_penalty = p->presence_penalty;
  row->frequency_penalty = p->frequency_penalty;
  row->repetition_penalty = p->repetition_penalty;
  row->seed = s->seed;
  row->counter = s->n_gen;
  if (p->repetition_penalty != 1.0f || p->frequency_penalty != 0.0f ||
      p->presence_penalty != 0.0f) {
    /* cand is scratch between samples: it carries the seen ids' counts. */
    for (int i = 0; i < s->n_seen; i++) s->cand[i] = s->count[s->seen_ids[i]];
    row->n_penalty = s->n_seen;
    row->penalty_ids = s->seen_ids;
    row->penalty_counts = s->cand;
  }
  return 1;
}

/* ---- sampling -------------------------------------------------------------------------- */

/* Largest logit, lowest id on ties; NaN logits never win. */
static int32_t argmax(const float *x, int n) {
  int32_t best = 0;
  for (int i = 1; i < n; i++)
    if (x[i] > x[best] || (isnan(x[best]) && !isnan(x[i]))) best = i;
  return best;
}

/* qsort has no context argument; a thread-local keeps concurrent samplers apart. */
static _Thread_local const float *tl_logits;

static int cmp_desc(const void *a, const void *b) {
  int32_t ia = *(const int32_t *)a, ib = *(const int32_t *)b;
  float la = tl_logits[ia], lb = tl_logits[ib];
  if (la > lb) return -1;
  if (la < lb) return 1;
  return ia < ib ? -1 : ia > ib;
}

/* Log-sum-exp of x[0..n). */
static double logsumexp(const float *x, int n) {
  float mx = x[argmax(x, n)];
  if (!isfinite(mx)) return mx;
  double sum = 0;
  for (int i = 0; i < n; i++) sum += exp((double)x[i] - mx);
  return mx + log(sum);
}

/* The k largest of x [V] (ties: lowest id first) as logprobs against lse, into out's top list. */
static void fill_top(const float *x, int V, int k, double lse, sample_result *out) {
  if (k > V) k = V;
  if (k > SAMPLING_MAX_LOGPROBS) k = SAMPLING_MAX_LOGPROBS;
  out->n_top = 0;
  /* Insertion into a sorted list of k: k <= 20, so O(vocab * k) at worst, O(vocab) typically. */
  for (int32_t i = 0; i < V && k > 0; i++) {
    float v = x[i];
    int n = out->n_top;
    if (n == k && !(v > out->top_logprobs[k - 1])) continue;
    int j = n < k ? n : k - 1;
    while (j > 0 && v > out->top_logprobs[j - 1]) {
      out->top_logprobs[j] = out->top_logprobs[j - 1];
      out->top_ids[j] = out->top_ids[j - 1];
      j--;
    }
    out->top_logprobs[j] = v;
    out->top_ids[j] = i;
    if (n < k) out->n_top++;
  }
  for (int i = 0; i < out->n_top; i++) out->top_logprobs[i] = (float)(out->top_logprobs[i] - lse);
}

static void fill_logprobs(sampler *s, const float *proc, int32_t token, sample_result *out) {
  double lse = logsumexp(proc, s->vocab);
  out->logprob = (float)(proc[token] - lse);
  fill_top(proc, s->vocab, s->p.logprobs < 0 ? 0 : s->p.logprobs, lse, out);
}

void sampling_prompt_logprob(const float *logits, int vocab, int32_t token, int k,
                             sample_result *out) {
  memset(out, 0, sizeof *out);
  if (vocab <= 0 || token < 0 || token >= vocab) return;
  double lse = logsumexp(logits, vocab);
  out->token = token;
  out->logprob = (float)(logits[token] - lse);
  /* Ties count against the token, as vLLM ranks it (tokens whose logprob is >= its own). */
  int rank = 0;
  for (int i = 0; i < vocab; i++) rank += logits[i] >= logits[token];
  out->rank = rank > 0 ? rank : 1;
  fill_top(logits, vocab, k < 0 ? 0 : k, lse, out);
}

/* Keeps in cand[0..) a superset of the top candidates that top-k (k > 0: the k largest) or
 * top-p (target > 0: the smallest prefix with that much mass) can select, so only those are
 * sorted. Logits are bucketed by their distance below the maximum; every token of an earlier
 * bucket is more likely than any of a later one, so the cut falls after the bucket where the
 * running count reaches k or the running mass reaches target. Returns the kept count. */
#define SAMPLING_BUCKETS 128
static int narrow_candidates(int32_t *cand, int n, const float *logits, float mx, int k,
                             double target) {
  int count[SAMPLING_BUCKETS] = {0};
  double mass[SAMPLING_BUCKETS] = {0};
  for (int i = 0; i < n; i++) {
    double gap = (double)mx - logits[cand[i]];
    int b = gap < SAMPLING_BUCKETS / 4.0 ? (int)(gap * 4) : SAMPLING_BUCKETS - 1;
    count[b]++;
    mass[b] += exp((double)logits[cand[i]] - mx);
  }
  int cut = SAMPLING_BUCKETS - 1, c = 0;
  double m = 0;
  for (int b = 0; b < SAMPLING_BUCKETS - 1; b++) {
    c += count[b];
    m += mass[b];
    if ((k > 0 && c >= k) || (target > 0 && m >= target)) {
      cut = b;
      break;
    }
  }
  if (cut == SAMPLING_BUCKETS - 1) return n;
  int kept = 0;
  for (int i = 0; i < n; i++) {
    double gap = (double)mx - logits[cand[i]];
    if (gap < SAMPLING_BUCKETS / 4.0 && (int)(gap * 4) <= cut) cand[kept++] = cand[i];
  }
  return kept;
}

int sampler_sample(sampler *s, float *logits, sample_result *out) {
  const sampling_params *p = &s->p;
  const int V = s->vocab;
  memset(out, 0, sizeof *out);
  for (int i = 0; i < p->n_logit_bias; i++) logits[p->logit_bias_ids[i]] += p->logit_bias[i];
  for (int i = 0; i < s->n_seen; i++) {
    int32_t id = s->seen_ids[i];
    float l = logits[id];
    if (p->repetition_penalty != 1.0f) l = l > 0 ? l / p->repetition_penalty : l * p->repetition_penalty;
    if (s->count[id]) l -= p->frequency_penalty * (float)s->count[id] + p->presence_penalty;
    logits[id] = l;
  }
  int greedy = p->temperature < SAMPLING_GREEDY_EPS;
  if (!greedy && p->temperature != 1.0f) {
    float inv = 1.0f / p->temperature;
    for (int i = 0; i < V; i++) logits[i] *= inv;
  }
  if (p->logprobs >= 0) memcpy(s->lp, logits, (size_t)V * sizeof(float));
  int32_t token;
  float top = logits[argmax(logits, V)];
  if (greedy || !isfinite(top)) { /* no finite logit: nothing to draw from, take the argmax */
    token = argmax(logits, V);
  } else {
    float mx = top;
    /* Candidates: min-p first (relative to the top probability), then top-k and top-p on the
     * survivors sorted by logit (ties by id, so the result is deterministic). */
    double min_logit = p->min_p > 0 ? mx + log(p->min_p) : -INFINITY;
    int n = 0;
    for (int i = 0; i < V; i++)
      if (logits[i] >= min_logit && !isnan(logits[i])) s->cand[n++] = i;
    int k = p->top_k > 0 && p->top_k < n ? p->top_k : n;
    double total = 0;
    for (int i = 0; i < n; i++) total += exp((double)logits[s->cand[i]] - mx);
    int sorted = 0;
    if (k < n || p->top_p < 1.0f) {
      int n_sort = narrow_candidates(s->cand, n, logits, mx, k < n ? k : 0,
                                     k < n ? 0 : p->top_p * total);
      tl_logits = logits;
      qsort(s->cand, (size_t)n_sort, sizeof *s->cand, cmp_desc);
      sorted = 1;
      if (k < n) {
        n = k;
        total = 0;
        for (int i = 0; i < n; i++) total += exp((double)logits[s->cand[i]] - mx);
      } else {
        n = n_sort; /* total stays the mass of every candidate: top-p's reference */
      }
    }
    if (sorted && p->top_p < 1.0f) {
      /* Smallest prefix whose mass reaches top_p (always at least one token). */
      double acc = 0, target = p->top_p * total;
      int keep = n;
      for (int i = 0; i < n; i++) {
        acc += exp((double)logits[s->cand[i]] - mx);
        if (acc >= target) {
          keep = i + 1;
          break;
        }
      }
      n = keep;
      total = acc; /* the kept prefix's mass (all n when rounding kept the loop going) */
    }
    double u = rng_uniform(s->rng) * total, acc = 0;
    token = s->cand[n - 1];
    for (int i = 0; i < n; i++) {
      acc += exp((double)logits[s->cand[i]] - mx);
      if (u < acc) {
        token = s->cand[i];
        break;
      }
    }
  }
  out->token = token;
  if (p->logprobs >= 0) fill_logprobs(s, s->lp, token, out);
  return 0;
}
