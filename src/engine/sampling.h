/* Per-request sampling parameters (OpenAI's fields plus vLLM's extras) and the sampler that turns
 * one row of logits into a token. Each request owns its RNG, seeded from its seed, so its output
 * does not depend on what else is in the batch. */
#ifndef TESSERA_SAMPLING_H
#define TESSERA_SAMPLING_H

#include <stddef.h>
#include <stdint.h>

#include "engine/batch.h"
#include "util/status.h"

#define SAMPLING_MAX_LOGPROBS 20

typedef struct {
  float temperature;        /* 0 = greedy */
  float top_p;              /* 1 = off */
  int top_k;                /* 0 or -1 = off */
  float min_p;              /* 0 = off */
  float presence_penalty;   /* OpenAI, over generated tokens */
  float frequency_penalty;  /* OpenAI, over generated tokens */
  float repetition_penalty; /* vLLM/HF, over prompt and generated tokens; 1 = off */
  int n_logit_bias;
  const int32_t *logit_bias_ids; /* [n_logit_bias] */
  const float *logit_bias;       /* [n_logit_bias] */
  uint64_t seed;
  int has_seed;             /* 0: seeded from the engine's RNG */
  int logprobs;             /* -1: none; k >= 0: the sampled token's logprob plus the top k */
} sampling_params;

void sampling_params_default(sampling_params *p);

/* One sequence's sampler state: its RNG and token counts for the penalties. */
typedef struct sampler sampler;

typedef struct {
  int32_t token;
  float logprob;               /* of the sampled token under the final (post-penalty) distribution */
  int n_top;
  int32_t top_ids[SAMPLING_MAX_LOGPROBS];
  float top_logprobs[SAMPLING_MAX_LOGPROBS];
  int rank;                    /* prompt logprobs: tokens at least as likely as token (1: the
                                  most likely); 0 for sampled tokens */
} sample_result;

int sampler_create(sampler **out, const sampling_params *p, int vocab_size, uint64_t engine_seed,
                   ts_err *err);
void sampler_free(sampler *s);
/* Records prompt tokens (repetition penalty) or generated tokens (all penalties). */
void sampler_observe_prompt(sampler *s, const int32_t *ids, size_t n);
void sampler_observe(sampler *s, int32_t id);
/* Samples from logits [vocab] (modified in place). No allocation. */
int sampler_sample(sampler *s, float *logits, sample_result *out);
/* A prompt token's logprob under the model's raw distribution (log-softmax of logits [vocab], no
 * penalties nor temperature, as vLLM reports prompt logprobs), its rank and the top k (k <=
 * SAMPLING_MAX_LOGPROBS) of that distribution, into out. */
void sampling_prompt_logprob(const float *logits, int vocab, int32_t token, int k,
                             sample_result *out);
/* Fills the row a device sampler needs to draw this sequence's next token from the same
 * distribution (its own counter-based stream, not this sampler's draws): 1 when the device can
 * (no logit_bias, no logprobs), else 0. The penalty lists point into the sampler and stay valid
 * until its next sample or observe. */
int sampler_device_row(sampler *s, ts_sample_row *row);

#endif
