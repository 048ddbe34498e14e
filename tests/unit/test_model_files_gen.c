/* Differential test of tools/gen_checkpoint.py against the loader: the generator's weights are a
 * pure function of (seed, name, index), re-derived here in C (splitmix64) and compared bit for bit
 * with what the loader maps from the HF files (f32, f16, bf16; single and sharded) and from the
 * GGUF files (Llama q/k rows permuted, 1-D tensors kept in F32). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/model_files.h"
#include "test_util.h"

static uint64_t fnv1a64(const char *s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
  return h;
}

static uint64_t sm64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/* The generator's value of element i of tensor name (seed 0), in float32. */
static float gen_value(const char *name, int64_t i, int64_t fan_in) {
  uint64_t key = fnv1a64(name);
  uint64_t v = sm64(sm64((uint64_t)i ^ key) + key);
  volatile float u = (float)(v >> 40) * (1.0f / 16777216.0f);
  u = u * 2.0f - 1.0f;
  size_t n = strlen(name);
  if (strstr(name, "norm.weight") || strstr(name, "layernorm")) {
    volatile float t = 0.1f * u;
    return 1.0f + t;
  }
  if (n > 5 && !strcmp(name + n - 5, ".bias")) return 0.1f * u;
  if (strstr(name, "embed_tokens")) return u;
  double gain = strstr(name, "lm_head") ? 2.0 : 1.0;
  return u * (float)(gain * sqrt(3.0 / (double)fan_in));
}

static float load_elem(const ts_tensor *t, int64_t r, int64_t c) {
  int64_t i = r * t->row_stride + c;
  if (t->dtype == TS_F32) return ((const float *)t->data)[i];
  uint16_t h = ((const uint16_t *)t->data)[i];
  return t->dtype == TS_F16 ? ts_f16_to_f32(h) : ts_bf16_to_f32(h);
}

static float round_to(ts_dtype dt, float x) {
  if (dt == TS_F16) return ts_f16_to_f32(ts_f32_to_f16(x));
  if (dt == TS_BF16) return ts_bf16_to_f32(ts_f32_to_bf16(x));
  return x;
}

static test_rng g_rng = {0xfeedfacecafebeefull};

/* Samples elements of a loaded view (row offset r0 into the full tensor) against the generator. */
static void check_tensor(const char *hf_name, const ts_tensor *t, ts_dtype want, int64_t full_cols,
                         int64_t r0, int permute_hd) {
  CHECK_MSG(ts_tensor_present(t), "%s absent", hf_name);
  if (!ts_tensor_present(t)) return;
  CHECK_MSG(t->dtype == want, "%s dtype %d want %d", hf_name, t->dtype, want);
  int64_t rows = t->shape[0], cols = t->ndim == 2 ? t->shape[1] : 1;
  for (int k = 0; k < 64; k++) {
    int64_t r = (int64_t)(test_rng_next(&g_rng) % (uint64_t)rows);
    int64_t c = (int64_t)(test_rng_next(&g_rng) % (uint64_t)cols);
    if (k == 0) r = c = 0;
    if (k == 1) r = rows - 1, c = cols - 1;
    int64_t src_row = r + r0;
    if (permute_hd) { /* GGUF row -> HF row: (2i, 2i+1) came from (i, i + hd/2) */
      int64_t h = src_row / permute_hd, j = src_row % permute_hd, half = permute_hd / 2;
      src_row = h * permute_hd + (j % 2) * half + j / 2;
    }
    float want_v = round_to(want, gen_value(hf_name, src_row * full_cols + c, full_cols));
    float got = t->ndim == 2 ? load_elem(t, r, c) : load_elem(t, 0, r);
    CHECK_MSG(got == want_v, "%s[%lld,%lld] = %g, generator %g", hf_name, (long long)r,
              (long long)c, (double)got, (double)want_v);
  }
}

static void check_model(const char *path, ts_dtype dt, int gguf, int tp_size) {
  model_files *mf = NULL;
  ts_err err;
  CHECK_MSG(model_files_open(&mf, path, &err) == TS_OK, "%s", err.msg);
  if (!mf) return;
  const model_config *c = model_files_config(mf);
  for (int rank = 0; rank < tp_size; rank++) {
    model_shard s = model_shard_default(c, rank, tp_size, 0, 1);
    model_weights w;
    CHECK_MSG(model_files_load_weights(mf, &s, &w, &err) == TS_OK, "%s: %s", path, err.msg);
    if (err.code) break;
    int64_t d = c->d_model, q = (int64_t)c->n_head * c->head_dim, kv = (int64_t)c->n_kv_head * c->head_dim;
    int pq = gguf && c->arch == ARCH_LLAMA ? c->head_dim : 0;
    ts_dtype d1 = gguf ? TS_F32 : dt; /* GGUF keeps 1-D tensors in F32 */
    check_tensor("model.embed_tokens.weight", &w.tok_embd, dt, d, 0, 0);
    check_tensor("model.norm.weight", &w.out_norm, d1, 1, 0, 0);
    check_tensor(c->tie_embeddings ? "model.embed_tokens.weight" : "lm_head.weight", &w.lm_head,
                 dt, d, 0, 0);
    for (int l = 0; l < w.n_layers; l++) {
      layer_weights *L = &w.layers[l];
      char n[160];
#define NAME(s) (snprintf(n, sizeof n, "model.layers.%d.%s", l, s), n)
      check_tensor(NAME("input_layernorm.weight"), &L->attn_norm, d1, 1, 0, 0);
      check_tensor(NAME("post_attention_layernorm.weight"), &L->ffn_norm, d1, 1, 0, 0);
      check_tensor(NAME("self_attn.q_proj.weight"), &L->wq, dt, d, rank * q / tp_size, pq);
      check_tensor(NAME("self_attn.k_proj.weight"), &L->wk, dt, d, rank * kv / tp_size, pq);
      check_tensor(NAME("self_attn.v_proj.weight"), &L->wv, dt, d, rank * kv / tp_size, 0);
      check_tensor(NAME("mlp.gate_proj.weight"), &L->w_gate, dt, d, rank * c->d_ff / tp_size, 0);
      check_tensor(NAME("mlp.up_proj.weight"), &L->w_up, dt, d, rank * c->d_ff / tp_size, 0);
      if (c->qkv_bias) {
        check_tensor(NAME("self_attn.q_proj.bias"), &L->bq, d1, 1, rank * q / tp_size, 0);
        check_tensor(NAME("self_attn.k_proj.bias"), &L->bk, d1, 1, rank * kv / tp_size, 0);
        check_tensor(NAME("self_attn.v_proj.bias"), &L->bv, d1, 1, rank * kv / tp_size, 0);
      }
      if (c->qk_norm) {
        check_tensor(NAME("self_attn.q_norm.weight"), &L->q_norm, d1, 1, 0, 0);
        check_tensor(NAME("self_attn.k_norm.weight"), &L->k_norm, d1, 1, 0, 0);
      }
      /* Column shards: compare through a shifted full-width view. */
      ts_tensor o = L->wo, dn = L->w_down;
      o.data = (char *)o.data - ts_dtype_bytes(o.dtype, rank * q / tp_size);
      o.shape[1] = q;
      dn.data = (char *)dn.data - ts_dtype_bytes(dn.dtype, rank * c->d_ff / tp_size);
      dn.shape[1] = c->d_ff;
      check_tensor(NAME("self_attn.o_proj.weight"), &o, dt, q, 0, 0);
      check_tensor(NAME("mlp.down_proj.weight"), &dn, dt, c->d_ff, 0, 0);
#undef NAME
    }
    model_weights_free(&w);
  }
  model_files_close(mf);
}

static int run_gen(const char *dir, const char *preset, const char *args) {
  char cmd[8192];
  snprintf(cmd, sizeof cmd,
           "'%s/.venv/bin/python' '%s/tools/gen_checkpoint.py' %s '%s/%s' --tokenizers "
           "'%s/tokenizers' %s",
           TESSERA_SOURCE_DIR, TESSERA_SOURCE_DIR, preset, dir, preset, test_shared_dir(), args);
  int rc = system(cmd);
  CHECK_MSG(rc == 0, "generator failed (%d): %s", rc, cmd);
  return rc;
}

int main(void) {
  char dir[1024], p[2048], g[2048];
  snprintf(dir, sizeof dir, "%s/tmp-model-files-gen-%d", TESSERA_BINARY_DIR, (int)getpid());
  mkdir(dir, 0755);
  struct {
    const char *preset, *args;
    ts_dtype dt;
    int tp;
  } cases[] = {
      {"tiny-qwen2", "--dtype bf16 --shards 3", TS_BF16, 2},
      {"tiny-qwen3", "--dtype f16", TS_F16, 2},
      {"tiny-llama-tied", "--dtype bf16", TS_BF16, 2},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    snprintf(g, sizeof g, "%s/%s.gguf", dir, cases[i].preset);
    char args[4096];
    snprintf(args, sizeof args, "%s --gguf '%s'", cases[i].args, g);
    if (run_gen(dir, cases[i].preset, args)) continue;
    snprintf(p, sizeof p, "%s/%s", dir, cases[i].preset);
    check_model(p, cases[i].dt, 0, cases[i].tp);
    check_model(g, cases[i].dt, 1, cases[i].tp);
    /* The GGUF metadata describes the same model as config.json. */
    model_files *a = NULL, *b = NULL;
    ts_err err;
    if (model_files_open(&a, p, &err) == TS_OK && model_files_open(&b, g, &err) == TS_OK) {
      const model_config *x = model_files_config(a), *y = model_files_config(b);
      CHECK(x->arch == y->arch && x->vocab_size == y->vocab_size && x->d_model == y->d_model);
      CHECK(x->n_layer == y->n_layer && x->n_head == y->n_head && x->n_kv_head == y->n_kv_head);
      CHECK(x->head_dim == y->head_dim && x->d_ff == y->d_ff && x->max_pos == y->max_pos);
      CHECK(x->rms_eps == y->rms_eps && x->rope_theta == y->rope_theta);
      CHECK(x->rope_scaling == y->rope_scaling && x->rope_factor == y->rope_factor);
      CHECK(x->rope_low_freq_factor == y->rope_low_freq_factor);
      CHECK(x->rope_high_freq_factor == y->rope_high_freq_factor);
      CHECK(x->rope_orig_max_pos == y->rope_orig_max_pos);
      CHECK(x->tie_embeddings == y->tie_embeddings && x->qkv_bias == y->qkv_bias);
      CHECK(x->qk_norm == y->qk_norm && x->bos_id == y->bos_id && x->eos_ids[0] == y->eos_ids[0]);
      CHECK(y->rope_interleaved == (y->arch == ARCH_LLAMA) && x->rope_interleaved == 0);
    } else {
      CHECK_MSG(0, "%s", err.msg);
    }
    model_files_close(a);
    model_files_close(b);
  }
  snprintf(p, sizeof p, "rm -rf '%s'", dir);
  CHECK(system(p) == 0);
  return test_finish("test_model_files_gen");
}
