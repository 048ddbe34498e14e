/* Model hyper-parameters from config.json / generation_config.json (jansson) or GGUF metadata,
 * their validation, and the default split of a model over tensor- and pipeline-parallel ranks. */
#include "model/config.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "model/gguf.h"

/* Bounds that keep every later size computation (d_model * vocab, n_head * head_dim ...) far from
 * overflow; real models sit well inside them. */
#define CFG_MAX_DIM (1 << 20)
#define CFG_MAX_VOCAB (1 << 24)
#define CFG_MAX_LAYERS 4096
#define CFG_MAX_HEADS 4096

static const char *arch_hf_names[ARCH_COUNT] = {"LlamaForCausalLM", "Qwen2ForCausalLM",
                                                "Qwen3ForCausalLM"};
static const char *arch_model_types[ARCH_COUNT] = {"llama", "qwen2", "qwen3"};

static void config_defaults(model_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->rms_eps = 1e-6f;
  cfg->rope_theta = 10000.0f;
  cfg->max_pos = 2048;
  cfg->bos_id = -1;
}

/* Checks what every consumer relies on: positive sizes inside the bounds, heads grouping. */
static int config_validate(const model_config *c, const char *fn, ts_err *err) {
  struct {
    const char *name;
    int v, max;
  } f[] = {{"vocab_size", c->vocab_size, CFG_MAX_VOCAB},
           {"hidden_size", c->d_model, CFG_MAX_DIM},
           {"num_hidden_layers", c->n_layer, CFG_MAX_LAYERS},
           {"num_attention_heads", c->n_head, CFG_MAX_HEADS},
           {"num_key_value_heads", c->n_kv_head, CFG_MAX_HEADS},
           {"head_dim", c->head_dim, 4096},
           {"intermediate_size", c->d_ff, CFG_MAX_DIM},
           {"max_position_embeddings", c->max_pos, 1 << 28}};
  for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
    if (f[i].v <= 0 || f[i].v > f[i].max)
      return ts_errorf(err, TS_EFORMAT, "%s: %s = %d is out of range (1..%d)", fn, f[i].name,
                       f[i].v, f[i].max);
  if (c->n_head % c->n_kv_head)
    return ts_errorf(err, TS_EFORMAT,
                     "%s: num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)",
                     fn, c->n_head, c->n_kv_head);
  if (c->head_dim % 2)
    return ts_errorf(err, TS_EFORMAT, "%s: head_dim %d must be even for RoPE", fn, c->head_dim);
  if (!(c->rms_eps > 0) || !(c->rms_eps < 1))
    return ts_errorf(err, TS_EFORMAT, "%s: rms_norm_eps %g is out of range (0, 1)", fn,
                     (double)c->rms_eps);
  if (!(c->rope_theta > 1) || !isfinite(c->rope_theta))
    return ts_errorf(err, TS_EFORMAT, "%s: rope_theta %g is out of range", fn,
                     (double)c->rope_theta);
  if (c->rope_scaling == ROPE_SCALING_LLAMA3 &&
      (!(c->rope_factor >= 1) || !(c->rope_high_freq_factor > c->rope_low_freq_factor) ||
       !(c->rope_low_freq_factor > 0) || c->rope_orig_max_pos <= 0 || !isfinite(c->rope_factor) ||
       !isfinite(c->rope_high_freq_factor)))
    return ts_errorf(err, TS_EFORMAT,
                     "%s: rope_scaling llama3 needs factor >= 1, 0 < low_freq_factor < "
                     "high_freq_factor and original_max_position_embeddings > 0",
                     fn);
  if (c->bos_id >= c->vocab_size)
    return ts_errorf(err, TS_EFORMAT, "%s: bos_token_id %d is outside the vocabulary (%d)", fn,
                     c->bos_id, c->vocab_size);
  for (int i = 0; i < c->n_eos; i++)
    if (c->eos_ids[i] < 0 || c->eos_ids[i] >= c->vocab_size)
      return ts_errorf(err, TS_EFORMAT, "%s: eos_token_id %d is outside the vocabulary (%d)", fn,
                       c->eos_ids[i], c->vocab_size);
  return TS_OK;
}

/* ---- config.json ---- */

/* Integer field: required (def < 0 means required) or def when absent/null. */
static int json_int_field(json_t *o, const char *key, int def, int *out, const char *fn,
                          ts_err *err) {
  json_t *v = json_object_get(o, key);
  if (!v || json_is_null(v)) {
    if (def < 0) return ts_errorf(err, TS_EFORMAT, "%s: missing field '%s'", fn, key);
    *out = def;
    return TS_OK;
  }
  if (!json_is_integer(v))
    return ts_errorf(err, TS_EFORMAT, "%s: field '%s' must be an integer", fn, key);
  json_int_t x = json_integer_value(v);
  if (x < -1 || x > (1 << 30))
    return ts_errorf(err, TS_EFORMAT, "%s: field '%s' = %lld is out of range", fn, key,
                     (long long)x);
  *out = (int)x;
  return TS_OK;
}

static int json_num_field(json_t *o, const char *key, double def, float *out, const char *fn,
                          ts_err *err) {
  json_t *v = json_object_get(o, key);
  if (!v || json_is_null(v)) {
    if (isnan(def)) return ts_errorf(err, TS_EFORMAT, "%s: missing field '%s'", fn, key);
    *out = (float)def;
    return TS_OK;
  }
  if (!json_is_number(v))
    return ts_errorf(err, TS_EFORMAT, "%s: field '%s' must be a number", fn, key);
  *out = (float)json_number_value(v);
  return TS_OK;
}

static int json_bool_field(json_t *o, const char *key, int def, int *out, const char *fn,
                           ts_err *err) {
  json_t *v = json_object_get(o, key);
  if (!v || json_is_null(v)) {
    *out = def;
    return TS_OK;
  }
  if (!json_is_boolean(v))
    return ts_errorf(err, TS_EFORMAT, "%s: field '%s' must be true or false", fn, key);
  *out = json_is_true(v);
  return TS_OK;
}

/* bos_token_id: int or null; eos_token_id: int, list of ints or null. Absent keys keep cfg. */
static int json_special_ids(json_t *o, model_config *cfg, const char *fn, ts_err *err) {
  json_t *b = json_object_get(o, "bos_token_id");
  if (b) {
    if (json_is_null(b)) cfg->bos_id = -1;
    else if (json_is_integer(b) && json_integer_value(b) >= 0 && json_integer_value(b) < (1 << 30))
      cfg->bos_id = (int)json_integer_value(b);
    else return ts_errorf(err, TS_EFORMAT, "%s: field 'bos_token_id' must be an integer", fn);
  }
  json_t *e = json_object_get(o, "eos_token_id");
  if (!e) return TS_OK;
  cfg->n_eos = 0;
  if (json_is_null(e)) return TS_OK;
  if (json_is_integer(e)) e = json_pack("[O]", e);
  else if (json_is_array(e)) json_incref(e);
  else return ts_errorf(err, TS_EFORMAT, "%s: field 'eos_token_id' must be an integer or a list", fn);
  if (!e) return ts_errorf(err, TS_ENOMEM, "%s: out of memory", fn);
  int rc = TS_OK;
  size_t i;
  json_t *x;
  json_array_foreach(e, i, x) {
    if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) >= (1 << 30)) {
      rc = ts_errorf(err, TS_EFORMAT, "%s: field 'eos_token_id' must hold integers >= 0", fn);
      break;
    }
    int id = (int)json_integer_value(x), dup = 0;
    for (int k = 0; k < cfg->n_eos; k++) dup |= cfg->eos_ids[k] == id;
    /* More than MODEL_MAX_EOS distinct stop ids is unheard of; the first ones are kept. */
    if (!dup && cfg->n_eos < MODEL_MAX_EOS) cfg->eos_ids[cfg->n_eos++] = id;
  }
  json_decref(e);
  return rc;
}

static int parse_rope_scaling(json_t *rs, model_config *cfg, const char *fn, ts_err *err) {
  if (!rs || json_is_null(rs)) return TS_OK;
  if (!json_is_object(rs))
    return ts_errorf(err, TS_EFORMAT, "%s: field 'rope_scaling' must be an object or null", fn);
  json_t *t = json_object_get(rs, "rope_type");
  if (!t) t = json_object_get(rs, "type");
  if (!json_is_string(t))
    return ts_errorf(err, TS_EFORMAT, "%s: rope_scaling needs a string 'rope_type'", fn);
  const char *ty = json_string_value(t);
  if (!strcmp(ty, "default")) return TS_OK;
  if (strcmp(ty, "llama3"))
    return ts_errorf(err, TS_EUNSUPPORTED,
                     "%s: unsupported rope_scaling type '%s' (supported: llama3, default)", fn, ty);
  cfg->rope_scaling = ROPE_SCALING_LLAMA3;
  TS_TRY(json_num_field(rs, "factor", NAN, &cfg->rope_factor, fn, err));
  TS_TRY(json_num_field(rs, "low_freq_factor", 1.0, &cfg->rope_low_freq_factor, fn, err));
  TS_TRY(json_num_field(rs, "high_freq_factor", 4.0, &cfg->rope_high_freq_factor, fn, err));
  TS_TRY(json_int_field(rs, "original_max_position_embeddings", 8192, &cfg->rope_orig_max_pos, fn,
                        err));
  return TS_OK;
}

static int config_from_json_obj(model_config *cfg, json_t *o, const char *fn, ts_err *err) {
  config_defaults(cfg);
  if (!json_is_object(o)) return ts_errorf(err, TS_EFORMAT, "%s: not a JSON object", fn);
  const char *arch = NULL;
  json_t *archs = json_object_get(o, "architectures");
  if (archs && !json_is_null(archs)) {
    if (!json_is_array(archs) || !json_is_string(json_array_get(archs, 0)))
      return ts_errorf(err, TS_EFORMAT, "%s: field 'architectures' must be a list of strings", fn);
    arch = json_string_value(json_array_get(archs, 0));
  }
  int a = -1;
  if (arch) {
    for (int i = 0; i < ARCH_COUNT; i++)
      if (!strcmp(arch, arch_hf_names[i])) a = i;
  } else {
    json_t *mt = json_object_get(o, "model_type");
    if (!json_is_string(mt))
      return ts_errorf(err, TS_EFORMAT, "%s: missing field 'architectures' (and 'model_type')", fn);
    arch = json_string_value(mt);
    for (int i = 0; i < ARCH_COUNT; i++)
      if (!strcmp(arch, arch_model_types[i])) a = i;
  }
  if (a < 0)
    return ts_errorf(err, TS_EUNSUPPORTED,
                     "%s: unsupported architecture '%s' (supported: LlamaForCausalLM, "
                     "Qwen2ForCausalLM, Qwen3ForCausalLM)",
                     fn, arch);
  cfg->arch = (model_arch)a;
  snprintf(cfg->arch_name, sizeof cfg->arch_name, "%s", arch_hf_names[a]);

  json_t *act = json_object_get(o, "hidden_act");
  if (act && !json_is_null(act) &&
      (!json_is_string(act) || strcmp(json_string_value(act), "silu")))
    return ts_errorf(err, TS_EUNSUPPORTED, "%s: unsupported hidden_act (only silu)", fn);
  TS_TRY(json_int_field(o, "vocab_size", -1, &cfg->vocab_size, fn, err));
  TS_TRY(json_int_field(o, "hidden_size", -1, &cfg->d_model, fn, err));
  TS_TRY(json_int_field(o, "num_hidden_layers", -1, &cfg->n_layer, fn, err));
  TS_TRY(json_int_field(o, "num_attention_heads", -1, &cfg->n_head, fn, err));
  TS_TRY(json_int_field(o, "intermediate_size", -1, &cfg->d_ff, fn, err));
  if (cfg->n_head <= 0)
    return ts_errorf(err, TS_EFORMAT, "%s: num_attention_heads must be > 0", fn);
  TS_TRY(json_int_field(o, "num_key_value_heads", cfg->n_head, &cfg->n_kv_head, fn, err));
  TS_TRY(json_int_field(o, "head_dim", cfg->d_model / cfg->n_head, &cfg->head_dim, fn, err));
  TS_TRY(json_int_field(o, "max_position_embeddings", 2048, &cfg->max_pos, fn, err));
  TS_TRY(json_num_field(o, "rms_norm_eps", 1e-6, &cfg->rms_eps, fn, err));
  TS_TRY(json_bool_field(o, "tie_word_embeddings", 0, &cfg->tie_embeddings, fn, err));

  /* transformers 5 moved rope_theta and the scaling dict into rope_parameters. */
  json_t *rp = json_object_get(o, "rope_parameters");
  if (rp && !json_is_null(rp)) {
    if (!json_is_object(rp))
      return ts_errorf(err, TS_EFORMAT, "%s: field 'rope_parameters' must be an object", fn);
    TS_TRY(json_num_field(rp, "rope_theta", 10000.0, &cfg->rope_theta, fn, err));
    TS_TRY(parse_rope_scaling(rp, cfg, fn, err));
  } else {
    TS_TRY(json_num_field(o, "rope_theta", 10000.0, &cfg->rope_theta, fn, err));
    TS_TRY(parse_rope_scaling(json_object_get(o, "rope_scaling"), cfg, fn, err));
  }

  int attn_bias = 0;
  TS_TRY(json_bool_field(o, "attention_bias", 0, &attn_bias, fn, err));
  /* Llama/Qwen3 attention_bias also puts a bias on o_proj, which no supported checkpoint has. */
  if (attn_bias && cfg->arch != ARCH_QWEN2)
    return ts_errorf(err, TS_EUNSUPPORTED, "%s: attention_bias = true is not supported for %s", fn,
                     arch);
  int mlp_bias = 0;
  TS_TRY(json_bool_field(o, "mlp_bias", 0, &mlp_bias, fn, err));
  if (mlp_bias) return ts_errorf(err, TS_EUNSUPPORTED, "%s: mlp_bias = true is not supported", fn);
  cfg->qkv_bias = cfg->arch == ARCH_QWEN2;
  cfg->qk_norm = cfg->arch == ARCH_QWEN3;
  TS_TRY(json_special_ids(o, cfg, fn, err));
  return config_validate(cfg, fn, err);
}

int config_from_hf_json(model_config *cfg, const char *json, size_t len, const char *name,
                        ts_err *err) {
  const char *fn = name ? name : "config.json";
  json_error_t je;
  json_t *o = json_loadb(json, len, JSON_REJECT_DUPLICATES, &je);
  if (!o) {
    config_defaults(cfg);
    return ts_errorf(err, TS_EFORMAT, "%s: not valid JSON (%s at line %d)", fn, je.text, je.line);
  }
  int rc = config_from_json_obj(cfg, o, fn, err);
  json_decref(o);
  return rc;
}

int config_apply_generation_json(model_config *cfg, const char *json, size_t len, const char *name,
                                 ts_err *err) {
  const char *fn = name ? name : "generation_config.json";
  json_error_t je;
  json_t *o = json_loadb(json, len, JSON_REJECT_DUPLICATES, &je);
  if (!o) return ts_errorf(err, TS_EFORMAT, "%s: not valid JSON (%s at line %d)", fn, je.text, je.line);
  int rc = json_is_object(o) ? json_special_ids(o, cfg, fn, err)
                             : ts_errorf(err, TS_EFORMAT, "%s: not a JSON object", fn);
  json_decref(o);
  if (rc < 0) return rc;
  return config_validate(cfg, fn, err);
}

/* ---- GGUF metadata ---- */

static int gguf_req_u64(const gguf_file *g, const char *arch, const char *suffix, int *out,
                        int required, ts_err *err) {
  char key[128];
  snprintf(key, sizeof key, "%s.%s", arch, suffix);
  uint64_t v;
  int rc = gguf_get_u64(g, key, &v);
  if (rc == TS_ENOTFOUND && !required) return TS_OK;
  if (rc == TS_ENOTFOUND) return ts_errorf(err, TS_EFORMAT, "%s: missing metadata key '%s'", g->path, key);
  if (rc < 0 || v > (1u << 30))
    return ts_errorf(err, TS_EFORMAT, "%s: metadata key '%s' must be a small unsigned integer",
                     g->path, key);
  *out = (int)v;
  return TS_OK;
}

static int gguf_opt_f32(const gguf_file *g, const char *arch, const char *suffix, float *out,
                        ts_err *err) {
  char key[128];
  snprintf(key, sizeof key, "%s.%s", arch, suffix);
  double v;
  int rc = gguf_get_f64(g, key, &v);
  if (rc == TS_ENOTFOUND) return TS_OK;
  if (rc < 0) return ts_errorf(err, TS_EFORMAT, "%s: metadata key '%s' must be a number", g->path, key);
  *out = (float)v;
  return TS_OK;
}

/* Llama 3 frequency factors as llama.cpp's converter writes them into rope_freqs.weight. */
static float llama3_freq_factor(const model_config *c, int i) {
  double freq = pow((double)c->rope_theta, -2.0 * i / c->head_dim);
  double wavelen = 2 * M_PI / freq;
  double lo_wl = c->rope_orig_max_pos / c->rope_low_freq_factor;
  double hi_wl = c->rope_orig_max_pos / c->rope_high_freq_factor;
  if (wavelen < hi_wl) return 1.0f;
  if (wavelen > lo_wl) return c->rope_factor;
  double s = (c->rope_orig_max_pos / wavelen - c->rope_low_freq_factor) /
             (c->rope_high_freq_factor - c->rope_low_freq_factor);
  return (float)(1.0 / ((1 - s) / c->rope_factor + s));
}

/* GGUF Llama 3 files carry the scaling as a tensor of per-frequency factors. Recovers the llama3
 * parameters (explicit keys when present, Meta's published defaults otherwise) and checks that
 * they reproduce the tensor, so a file with some other scaling is refused rather than misread. */
static int gguf_rope_freqs(const gguf_file *g, model_config *c, const char *arch, ts_err *err) {
  const gguf_tensor *t = gguf_find_tensor(g, "rope_freqs.weight");
  if (!t) return TS_OK;
  int half = c->head_dim / 2;
  if (t->dtype != TS_F32 || t->ndim != 1 || t->ne[0] != half)
    return ts_errorf(err, TS_EFORMAT, "%s: tensor 'rope_freqs.weight' must be F32 [%d]", g->path,
                     half);
  const float *f = t->data;
  float mx = 1.0f;
  for (int i = 0; i < half; i++) {
    float v = 0;
    memcpy(&v, f + i, 4);
    if (v > mx) mx = v;
  }
  if (c->rope_scaling != ROPE_SCALING_LLAMA3) {
    c->rope_scaling = ROPE_SCALING_LLAMA3;
    c->rope_factor = mx;
    c->rope_low_freq_factor = 1.0f;
    c->rope_high_freq_factor = 4.0f;
    if (!c->rope_orig_max_pos) c->rope_orig_max_pos = 8192;
    TS_TRY(gguf_opt_f32(g, arch, "rope.scaling.low_freq_factor", &c->rope_low_freq_factor, err));
    TS_TRY(gguf_opt_f32(g, arch, "rope.scaling.high_freq_factor", &c->rope_high_freq_factor, err));
  }
  if (c->rope_high_freq_factor <= c->rope_low_freq_factor || c->rope_low_freq_factor <= 0)
    return ts_errorf(err, TS_EFORMAT, "%s: bad llama3 rope scaling factors", g->path);
  for (int i = 0; i < half; i++) {
    float v = 0, want = llama3_freq_factor(c, i);
    memcpy(&v, f + i, 4);
    if (!(fabsf(v - want) <= 1e-3f * fabsf(want)))
      return ts_errorf(err, TS_EUNSUPPORTED,
                       "%s: rope_freqs.weight[%d] = %g does not match llama3 scaling (factor %g, "
                       "low %g, high %g, original context %d): unsupported RoPE scaling",
                       g->path, i, (double)v, (double)c->rope_factor,
                       (double)c->rope_low_freq_factor, (double)c->rope_high_freq_factor,
                       c->rope_orig_max_pos);
  }
  return TS_OK;
}

int config_from_gguf(model_config *cfg, const gguf_file *g, ts_err *err) {
  config_defaults(cfg);
  gguf_str s;
  if (gguf_get_str(g, "general.architecture", &s) < 0)
    return ts_errorf(err, TS_EFORMAT, "%s: missing metadata key 'general.architecture'", g->path);
  char arch[32];
  if (s.len >= sizeof arch)
    return ts_errorf(err, TS_EUNSUPPORTED, "%s: unsupported architecture (name too long)", g->path);
  memcpy(arch, s.ptr, s.len);
  arch[s.len] = '\0';
  int a = -1;
  for (int i = 0; i < ARCH_COUNT; i++)
    if (!strcmp(arch, arch_model_types[i])) a = i;
  if (a < 0)
    return ts_errorf(err, TS_EUNSUPPORTED,
                     "%s: unsupported architecture '%s' (supported: llama, qwen2, qwen3)", g->path,
                     arch);
  cfg->arch = (model_arch)a;
  snprintf(cfg->arch_name, sizeof cfg->arch_name, "%s", arch);
  TS_TRY(gguf_req_u64(g, arch, "block_count", &cfg->n_layer, 1, err));
  TS_TRY(gguf_req_u64(g, arch, "embedding_length", &cfg->d_model, 1, err));
  TS_TRY(gguf_req_u64(g, arch, "feed_forward_length", &cfg->d_ff, 1, err));
  TS_TRY(gguf_req_u64(g, arch, "attention.head_count", &cfg->n_head, 1, err));
  cfg->n_kv_head = cfg->n_head;
  TS_TRY(gguf_req_u64(g, arch, "attention.head_count_kv", &cfg->n_kv_head, 0, err));
  if (cfg->n_head <= 0) return ts_errorf(err, TS_EFORMAT, "%s: attention.head_count must be > 0", g->path);
  cfg->head_dim = cfg->d_model / cfg->n_head;
  TS_TRY(gguf_req_u64(g, arch, "attention.key_length", &cfg->head_dim, 0, err));
  TS_TRY(gguf_req_u64(g, arch, "context_length", &cfg->max_pos, 0, err));
  int rope_dims = cfg->head_dim;
  TS_TRY(gguf_req_u64(g, arch, "rope.dimension_count", &rope_dims, 0, err));
  if (rope_dims != cfg->head_dim)
    return ts_errorf(err, TS_EUNSUPPORTED,
                     "%s: %s.rope.dimension_count %d differs from the head size %d (partial "
                     "rotary embeddings are not supported)",
                     g->path, arch, rope_dims, cfg->head_dim);
  TS_TRY(gguf_opt_f32(g, arch, "attention.layer_norm_rms_epsilon", &cfg->rms_eps, err));
  TS_TRY(gguf_opt_f32(g, arch, "rope.freq_base", &cfg->rope_theta, err));

  char key[128];
  snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
  gguf_str st;
  if (gguf_get_str(g, key, &st) == TS_OK) {
    if (st.len == 6 && !memcmp(st.ptr, "llama3", 6)) {
      cfg->rope_scaling = ROPE_SCALING_LLAMA3;
      TS_TRY(gguf_opt_f32(g, arch, "rope.scaling.factor", &cfg->rope_factor, err));
      cfg->rope_low_freq_factor = 1.0f;
      cfg->rope_high_freq_factor = 4.0f;
      TS_TRY(gguf_opt_f32(g, arch, "rope.scaling.low_freq_factor", &cfg->rope_low_freq_factor, err));
      TS_TRY(gguf_opt_f32(g, arch, "rope.scaling.high_freq_factor", &cfg->rope_high_freq_factor,
                          err));
    } else if (!(st.len == 4 && !memcmp(st.ptr, "none", 4))) {
      return ts_errorf(err, TS_EUNSUPPORTED, "%s: unsupported rope scaling type '%.*s'", g->path,
                       (int)(st.len > 64 ? 64 : st.len), st.ptr);
    }
  }
  TS_TRY(gguf_req_u64(g, arch, "rope.scaling.original_context_length", &cfg->rope_orig_max_pos, 0,
                      err));
  if (cfg->arch == ARCH_LLAMA && cfg->head_dim > 0 && cfg->head_dim % 2 == 0)
    TS_TRY(gguf_rope_freqs(g, cfg, arch, err));

  const gguf_kv *toks = gguf_find_kv(g, "tokenizer.ggml.tokens");
  if (toks && toks->type == GGUF_TYPE_ARRAY && toks->arr_type == GGUF_TYPE_STRING)
    cfg->vocab_size = toks->arr_len > (1u << 30) ? -1 : (int)toks->arr_len;
  const gguf_tensor *emb = gguf_find_tensor(g, "token_embd.weight");
  if (!toks && emb && emb->ndim == 2) cfg->vocab_size = emb->ne[1] > (1 << 30) ? -1 : (int)emb->ne[1];
  uint64_t id;
  if (gguf_get_u64(g, "tokenizer.ggml.bos_token_id", &id) == TS_OK && id < (1u << 30))
    cfg->bos_id = (int)id;
  if (gguf_get_u64(g, "tokenizer.ggml.eos_token_id", &id) == TS_OK && id < (1u << 30))
    cfg->eos_ids[cfg->n_eos++] = (int)id;
  if (gguf_get_u64(g, "tokenizer.ggml.eot_token_id", &id) == TS_OK && id < (1u << 30) &&
      (cfg->n_eos == 0 || cfg->eos_ids[0] != (int)id))
    cfg->eos_ids[cfg->n_eos++] = (int)id;
  cfg->tie_embeddings = gguf_find_tensor(g, "output.weight") == NULL;
  cfg->qkv_bias = cfg->arch == ARCH_QWEN2;
  cfg->qk_norm = cfg->arch == ARCH_QWEN3;
  /* llama.cpp's converter permutes Llama q/k rows for the interleaved RoPE; Qwen's are not. */
  cfg->rope_interleaved = cfg->arch == ARCH_LLAMA;
  return config_validate(cfg, g->path, err);
}

/* ---- shards ---- */

model_shard model_shard_default(const model_config *cfg, int tp_rank, int tp_size, int pp_rank,
                                int pp_size) {
  model_shard s = {tp_rank, tp_size, pp_rank, pp_size, 0, cfg->n_layer};
  if (pp_size > 0 && pp_rank >= 0 && pp_rank < pp_size) {
    int base = cfg->n_layer / pp_size, rem = cfg->n_layer % pp_size;
    s.layer_start = pp_rank * base + (pp_rank < rem ? pp_rank : rem);
    s.layer_end = s.layer_start + base + (pp_rank < rem ? 1 : 0);
  }
  return s;
}

int model_shard_validate(const model_config *cfg, const model_shard *s, ts_err *err) {
  if (s->tp_size < 1 || s->tp_rank < 0 || s->tp_rank >= s->tp_size)
    return ts_errorf(err, TS_EINVAL, "tensor-parallel rank %d of %d is invalid", s->tp_rank,
                     s->tp_size);
  if (s->pp_size < 1 || s->pp_rank < 0 || s->pp_rank >= s->pp_size)
    return ts_errorf(err, TS_EINVAL, "pipeline-parallel rank %d of %d is invalid", s->pp_rank,
                     s->pp_size);
  if (cfg->n_head % s->tp_size || cfg->n_kv_head % s->tp_size)
    return ts_errorf(err, TS_EINVAL,
                     "tensor-parallel size %d must divide the attention heads (%d) and key/value "
                     "heads (%d)",
                     s->tp_size, cfg->n_head, cfg->n_kv_head);
  if (cfg->d_ff % s->tp_size)
    return ts_errorf(err, TS_EINVAL, "tensor-parallel size %d must divide intermediate_size %d",
                     s->tp_size, cfg->d_ff);
  if (s->pp_size > cfg->n_layer)
    return ts_errorf(err, TS_EINVAL, "pipeline-parallel size %d exceeds the %d layers",
                     s->pp_size, cfg->n_layer);
  if (s->layer_start < 0 || s->layer_end > cfg->n_layer || s->layer_start >= s->layer_end)
    return ts_errorf(err, TS_EINVAL, "layer range [%d, %d) is invalid for %d layers",
                     s->layer_start, s->layer_end, cfg->n_layer);
  return TS_OK;
}
