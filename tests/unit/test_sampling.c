/* The sampler against reference formulas: greedy is argmax (lowest id on ties); seeded draws
 * follow softmax(logits / T) (chi-square); top-k / top-p / min-p never return excluded tokens and
 * renormalise what they keep; penalties and logit_bias match the formulas; logprobs are the
 * log-softmax of the processed logits; a seed replays exactly. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/sampling.h"
#include "test_util.h"

static test_rng rng = {0x2545f4914f6cdd1dull};

static void rand_logits(float *l, int n, float scale) {
  for (int i = 0; i < n; i++) l[i] = test_rng_float(&rng) * scale;
}

static sampler *make(const sampling_params *p, int vocab, uint64_t seed) {
  sampler *s = NULL;
  ts_err err = {0};
  int rc = sampler_create(&s, p, vocab, seed, &err);
  CHECK_MSG(rc == 0, "sampler_create: %s", err.msg);
  return s;
}

/* Pearson chi-square of counts against probabilities; draws * prob >= 5 in every used cell. */
static double chi2(const int *counts, const double *prob, int n, int draws) {
  double x = 0;
  for (int i = 0; i < n; i++) {
    double e = prob[i] * draws;
    if (e > 0) x += (counts[i] - e) * (counts[i] - e) / e;
    else CHECK_MSG(counts[i] == 0, "token %d has probability 0 but was drawn", i);
  }
  return x;
}

static void test_greedy(void) {
  for (int trial = 0; trial < 50; trial++) {
    int V = 1 + (int)(test_rng_next(&rng) % 300);
    float *l = malloc(sizeof(float) * V);
    rand_logits(l, V, 10);
    int best = 0;
    for (int i = 1; i < V; i++)
      if (l[i] > l[best]) best = i;
    if (trial % 3 == 0 && V > 2) { /* a tie after the first maximum: the lower id wins */
      int j = (int)(test_rng_next(&rng) % V);
      if (j < best) {
        l[j] = l[best];
        best = j;
      } else {
        l[j] = l[best];
      }
    }
    sampling_params p;
    sampling_params_default(&p);
    p.temperature = 0;
    sampler *s = make(&p, V, 1);
    sample_result r;
    CHECK(sampler_sample(s, l, &r) == 0);
    CHECK_MSG(r.token == best, "greedy %d vs argmax %d", r.token, best);
    sampler_free(s);
    free(l);
  }
}

static void softmax(const float *l, int n, float t, double *out) {
  double mx = -1e300, sum = 0;
  for (int i = 0; i < n; i++) mx = l[i] / t > mx ? l[i] / t : mx;
  for (int i = 0; i < n; i++) sum += (out[i] = exp(l[i] / t - mx));
  for (int i = 0; i < n; i++) out[i] /= sum;
}

/* Draws `draws` tokens with params p from fixed logits l and checks them against the expected
 * distribution `want` (chi-square at df = support - 1, far tail). */
static void check_distribution(const sampling_params *p, const float *l, int V, const double *want,
                               int draws, const char *what) {
  sampler *s = make(p, V, 1234);
  int *counts = calloc((size_t)V, sizeof(int));
  float *buf = malloc(sizeof(float) * V);
  for (int d = 0; d < draws; d++) {
    memcpy(buf, l, sizeof(float) * V);
    sample_result r;
    sampler_sample(s, buf, &r);
    CHECK(r.token >= 0 && r.token < V);
    counts[r.token]++;
  }
  int support = 0;
  for (int i = 0; i < V; i++) support += want[i] > 0;
  double x = chi2(counts, want, V, draws);
  /* df <= 40: mean df, sd sqrt(2 df); df + 8 sd + 10 is beyond the 1e-9 tail. */
  double limit = (support - 1) + 8 * sqrt(2.0 * (support - 1)) + 10;
  CHECK_MSG(x < limit, "%s: chi-square %.1f over %d tokens (limit %.1f)", what, x, support, limit);
  sampler_free(s);
  free(counts);
  free(buf);
}

static void test_distributions(void) {
  enum { V = 12 };
  float l[V];
  double want[V];
  for (int trial = 0; trial < 3; trial++) {
    rand_logits(l, V, 2);
    sampling_params p;
    sampling_params_default(&p);
    p.temperature = 0.5f + 0.4f * trial;
    softmax(l, V, p.temperature, want);
    check_distribution(&p, l, V, want, 40000, "temperature");

    /* top-k keeps the k largest and renormalises. */
    p.top_k = 4;
    int order[V];
    for (int i = 0; i < V; i++) order[i] = i;
    for (int i = 0; i < V; i++)
      for (int j = i + 1; j < V; j++)
        if (l[order[j]] > l[order[i]]) {
          int t = order[i];
          order[i] = order[j];
          order[j] = t;
        }
    double k_want[V] = {0}, sum = 0;
    for (int i = 0; i < 4; i++) sum += want[order[i]];
    for (int i = 0; i < 4; i++) k_want[order[i]] = want[order[i]] / sum;
    check_distribution(&p, l, V, k_want, 20000, "top-k");

    /* top-p keeps the smallest prefix (by probability) whose mass reaches p. */
    p.top_k = 0;
    p.top_p = 0.6f;
    double p_want[V] = {0}, acc = 0;
    int keep = 0;
    while (keep < V && acc < 0.6) acc += want[order[keep++]];
    for (int i = 0; i < keep; i++) p_want[order[i]] = want[order[i]] / acc;
    check_distribution(&p, l, V, p_want, 20000, "top-p");

    /* min-p keeps tokens with probability >= min_p * the top probability. */
    p.top_p = 1;
    p.min_p = 0.3f;
    double m_want[V] = {0}, msum = 0;
    for (int i = 0; i < V; i++)
      if (want[i] >= 0.3 * want[order[0]] * (1 - 1e-6)) msum += (m_want[i] = want[i]);
    for (int i = 0; i < V; i++) m_want[i] /= msum;
    check_distribution(&p, l, V, m_want, 20000, "min-p");
  }
}

/* A wider vocabulary whose nucleus spans many logit buckets: top-p (alone and under top-k) still
 * draws exactly the renormalised prefix. */
static void test_wide_nucleus(void) {
  enum { V = 96 };
  float l[V];
  double want[V], cut[V];
  for (int trial = 0; trial < 2; trial++) {
    for (int i = 0; i < V; i++) l[i] = test_rng_float(&rng) * 5 + (i % 7 == 0 ? 3 : 0);
    sampling_params p;
    sampling_params_default(&p);
    p.temperature = 1.3f;
    p.top_p = 0.85f;
    p.top_k = trial ? 40 : 0;
    softmax(l, V, p.temperature, want);
    int order[V];
    for (int i = 0; i < V; i++) order[i] = i;
    for (int i = 0; i < V; i++)
      for (int j = i + 1; j < V; j++)
        if (l[order[j]] > l[order[i]]) {
          int t = order[i];
          order[i] = order[j];
          order[j] = t;
        }
    int kk = p.top_k ? p.top_k : V;
    double mass = 0, acc = 0;
    for (int i = 0; i < kk; i++) mass += want[order[i]];
    int keep = 0;
    while (keep < kk && acc < 0.85 * mass) acc += want[order[keep++]];
    for (int i = 0; i < V; i++) cut[i] = 0;
    for (int i = 0; i < keep; i++) cut[order[i]] = want[order[i]] / acc;
    check_distribution(&p, l, V, cut, 30000, trial ? "top-k + wide top-p" : "wide top-p");
  }
}

/* Over a large random vocabulary, truncation never lets an excluded token through. */
static void test_exclusion(void) {
  enum { V = 1000 };
  static float l[V], buf[V];
  for (int trial = 0; trial < 300; trial++) {
    rand_logits(l, V, 6);
    sampling_params p;
    sampling_params_default(&p);
    p.temperature = 0.2f + (float)(test_rng_next(&rng) % 100) / 50.0f;
    int mode = trial % 3;
    if (mode == 0) p.top_k = 1 + (int)(test_rng_next(&rng) % 20);
    if (mode == 1) p.top_p = 0.05f + 0.9f * (float)(test_rng_next(&rng) % 100) / 100.0f;
    if (mode == 2) p.min_p = 0.01f + 0.9f * (float)(test_rng_next(&rng) % 100) / 100.0f;
    sampler *s = make(&p, V, test_rng_next(&rng));
    double prob[V];
    softmax(l, V, p.temperature, prob);
    double top = 0;
    for (int i = 0; i < V; i++) top = prob[i] > top ? prob[i] : top;
    for (int d = 0; d < 20; d++) {
      memcpy(buf, l, sizeof l);
      sample_result r;
      sampler_sample(s, buf, &r);
      int higher = 0; /* tokens strictly more likely than the drawn one */
      double mass_above = 0;
      for (int i = 0; i < V; i++)
        if (l[i] > l[r.token]) {
          higher++;
          mass_above += prob[i];
        }
      if (mode == 0) CHECK_MSG(higher < p.top_k, "top_k %d drew rank %d", p.top_k, higher);
      if (mode == 1) CHECK_MSG(mass_above < p.top_p + 1e-6, "top_p %g drew past mass %g", p.top_p, mass_above);
      if (mode == 2) CHECK_MSG(prob[r.token] >= p.min_p * top * (1 - 1e-5), "min_p %g drew p=%g (top %g)", p.min_p, prob[r.token], top);
    }
    sampler_free(s);
  }
}

static void test_penalties(void) {
  enum { V = 64 };
  for (int trial = 0; trial < 20; trial++) {
    float l[V], got[V];
    rand_logits(l, V, 5);
    sampling_params p;
    sampling_params_default(&p);
    p.temperature = 0;
    p.repetition_penalty = 1.0f + (float)(test_rng_next(&rng) % 100) / 50.0f;
    p.presence_penalty = test_rng_float(&rng) * 2;
    p.frequency_penalty = test_rng_float(&rng) * 2;
    int32_t bias_ids[3] = {(int32_t)(test_rng_next(&rng) % V), (int32_t)(test_rng_next(&rng) % V), 7};
    float bias[3] = {test_rng_float(&rng) * 3, test_rng_float(&rng) * 3, 0.25f};
    p.n_logit_bias = 3;
    p.logit_bias_ids = bias_ids;
    p.logit_bias = bias;
    sampler *s = make(&p, V, 9);
    int in_prompt[V] = {0}, count[V] = {0};
    int32_t prompt[10];
    for (int i = 0; i < 10; i++) in_prompt[prompt[i] = (int32_t)(test_rng_next(&rng) % V)] = 1;
    sampler_observe_prompt(s, prompt, 10);
    for (int i = 0; i < 15; i++) {
      int32_t id = (int32_t)(test_rng_next(&rng) % V);
      count[id]++;
      sampler_observe(s, id);
    }
    memcpy(got, l, sizeof l);
    sample_result r;
    sampler_sample(s, got, &r);
    float want[V];
    memcpy(want, l, sizeof l);
    for (int i = 0; i < 3; i++) want[bias_ids[i]] += bias[i];
    for (int i = 0; i < V; i++) {
      if (in_prompt[i] || count[i])
        want[i] = want[i] > 0 ? want[i] / p.repetition_penalty : want[i] * p.repetition_penalty;
      if (count[i]) want[i] -= p.frequency_penalty * count[i] + p.presence_penalty;
      CHECK_MSG(fabsf(got[i] - want[i]) <= 1e-5f * (1 + fabsf(want[i])), "penalty token %d: %g vs %g", i, got[i], want[i]);
    }
    int best = 0;
    for (int i = 1; i < V; i++)
      if (want[i] > want[best]) best = i;
    CHECK(r.token == best);
    sampler_free(s);
  }
  /* A large logit_bias forces its token. */
  float l[V];
  rand_logits(l, V, 1);
  int32_t id = 33;
  float b = 100;
  sampling_params p;
  sampling_params_default(&p);
  p.n_logit_bias = 1;
  p.logit_bias_ids = &id;
  p.logit_bias = &b;
  sampler *s = make(&p, V, 5);
  sample_result r;
  sampler_sample(s, l, &r);
  CHECK(r.token == 33);
  sampler_free(s);
}

static void test_logprobs_and_seed(void) {
  enum { V = 200 };
  float l[V], buf[V];
  rand_logits(l, V, 4);
  sampling_params p;
  sampling_params_default(&p);
  p.temperature = 0.8f;
  p.logprobs = 5;
  p.seed = 77;
  p.has_seed = 1;
  sampler *a = make(&p, V, 1), *b = make(&p, V, 2);
  double prob[V];
  softmax(l, V, p.temperature, prob);
  for (int d = 0; d < 50; d++) {
    sample_result ra, rb;
    memcpy(buf, l, sizeof l);
    sampler_sample(a, buf, &ra);
    memcpy(buf, l, sizeof l);
    sampler_sample(b, buf, &rb);
    CHECK(ra.token == rb.token); /* the request seed wins over the engine seed */
    CHECK(fabs(ra.logprob - log(prob[ra.token])) < 1e-4);
    CHECK(ra.n_top == 5);
    for (int i = 0; i < ra.n_top; i++) {
      CHECK(fabs(ra.top_logprobs[i] - log(prob[ra.top_ids[i]])) < 1e-4);
      if (i) CHECK(ra.top_logprobs[i] <= ra.top_logprobs[i - 1]);
      int higher = 0;
      for (int j = 0; j < V; j++) higher += prob[j] > prob[ra.top_ids[i]];
      CHECK(higher == i);
    }
  }
  sampler_free(a);
  sampler_free(b);
  /* Without a request seed, different engine seeds give different streams. */
  p.has_seed = 0;
  a = make(&p, V, 1);
  b = make(&p, V, 2);
  int same = 0;
  for (int d = 0; d < 50; d++) {
    sample_result ra, rb;
    memcpy(buf, l, sizeof l);
    sampler_sample(a, buf, &ra);
    memcpy(buf, l, sizeof l);
    sampler_sample(b, buf, &rb);
    same += ra.token == rb.token;
  }
  CHECK(same < 40);
  sampler_free(a);
  sampler_free(b);
  /* Invalid parameters are refused with a message. */
  ts_err err = {0};
  sampler *bad = NULL;
  sampling_params_default(&p);
  p.top_p = 0;
  CHECK(sampler_create(&bad, &p, V, 1, &err) == TS_EINVAL && strstr(err.msg, "top_p"));
  sampling_params_default(&p);
  p.temperature = -1;
  CHECK(sampler_create(&bad, &p, V, 1, &err) == TS_EINVAL);
  sampling_params_default(&p);
  int32_t id = V;
  float bias = 1;
  p.n_logit_bias = 1;
  p.logit_bias_ids = &id;
  p.logit_bias = &bias;
  CHECK(sampler_create(&bad, &p, V, 1, &err) == TS_EINVAL && strstr(err.msg, "logit_bias"));
  CHECK(bad == NULL);
}

int main(void) {
  test_greedy();
  test_distributions();
  test_wide_nucleus();
  test_exclusion();
  test_penalties();
  test_logprobs_and_seed();
  return test_finish("test_sampling");
}
