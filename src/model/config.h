/* Model hyper-parameters, read from config.json or GGUF metadata, and the shard a process owns. */
#ifndef TESSERA_MODEL_CONFIG_H
#define TESSERA_MODEL_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "util/status.h"

typedef enum { ARCH_LLAMA = 0, ARCH_QWEN2, ARCH_QWEN3, ARCH_COUNT } model_arch;

typedef enum { ROPE_SCALING_NONE = 0, ROPE_SCALING_LLAMA3 } rope_scaling_type;

#define MODEL_MAX_EOS 8

typedef struct {
  model_arch arch;
  char arch_name[64];   /* as the file says, e.g. "Qwen3ForCausalLM" */
  int vocab_size;
  int d_model;          /* hidden_size */
  int n_layer;
  int n_head;
  int n_kv_head;
  int head_dim;
  int d_ff;             /* intermediate_size */
  int max_pos;          /* max_position_embeddings */
  float rms_eps;
  float rope_theta;
  rope_scaling_type rope_scaling;
  float rope_factor;           /* llama3 scaling */
  float rope_low_freq_factor;
  float rope_high_freq_factor;
  int rope_orig_max_pos;
  /* GGUF stores Llama q/k rows permuted for the interleaved (GPT-J) RoPE pairing; the forward
   * then rotates adjacent pairs (2i, 2i+1) instead of (i, i + head_dim/2). No weight copy. */
  int rope_interleaved;
  int tie_embeddings;
  int qkv_bias;         /* Qwen2 */
  int qk_norm;          /* Qwen3 */
  int bos_id;           /* -1 when none */
  int eos_ids[MODEL_MAX_EOS];
  int n_eos;
} model_config;

/* Parses config.json text (name is used in error lines) into cfg. Fields generation_config.json
 * does not carry (bos/eos) are taken from config.json when present. */
int config_from_hf_json(model_config *cfg, const char *json, size_t len, const char *name,
                        ts_err *err);
/* Overrides bos/eos from generation_config.json text (eos_token_id: int or list). */
int config_apply_generation_json(model_config *cfg, const char *json, size_t len, const char *name,
                                 ts_err *err);
/* Reads the hyper-parameters from GGUF metadata (general.architecture = llama|qwen2|qwen3). */
struct gguf_file;
int config_from_gguf(model_config *cfg, const struct gguf_file *g, ts_err *err);

/* Which part of the model this process holds. One rank: {0,1,0,1} and the full layer range. */
typedef struct {
  int tp_rank, tp_size;
  int pp_rank, pp_size;
  int layer_start, layer_end; /* [start, end) of global layer indices on this stage */
} model_shard;

/* Even split of n_layer over pp_size stages (earlier stages take the remainder). */
model_shard model_shard_default(const model_config *cfg, int tp_rank, int tp_size, int pp_rank,
                                int pp_size);
/* Checks that the shard is valid for cfg (tp divides heads and kv heads, layer range sane). */
int model_shard_validate(const model_config *cfg, const model_shard *shard, ts_err *err);

static inline int model_shard_is_first(const model_shard *s) { return s->pp_rank == 0; }
static inline int model_shard_is_last(const model_shard *s) { return s->pp_rank == s->pp_size - 1; }

#endif
