/* A model on disk (HF directory with single or sharded safetensors, or one GGUF file): opening,
 * configuration, tensor look-up by name, the per-rank weight views with their shape checks, and
 * the fingerprint used by the distributed handshake. */
#include "model/model_files.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "model/gguf.h"
#include "model/safetensors.h"

struct model_files {
  char *path;
  model_format fmt;
  model_config cfg;
  st_file **st; /* HF: one per safetensors file */
  int n_st;
  gguf_file *gguf;
};

static const char *base_name(const char *p) {
  const char *s = strrchr(p, '/');
  return s ? s + 1 : p;
}

/* Whole small file (config/index JSON) into a NUL-terminated buffer. */
static int read_text(const char *path, char **out, size_t *len, ts_err *err) {
  FILE *f = fopen(path, "rb");
  if (!f) return ts_errorf(err, errno == ENOENT ? TS_ENOTFOUND : TS_EIO, "%s: cannot open (%s)",
                           path, strerror(errno));
  char *buf = NULL;
  size_t n = 0, cap = 0;
  for (;;) {
    if (n + 4096 + 1 > cap) {
      cap = cap ? cap * 2 : 8192;
      if (cap > (256u << 20)) {
        free(buf);
        fclose(f);
        return ts_errorf(err, TS_EFORMAT, "%s: too large for a JSON configuration file", path);
      }
      char *nb = realloc(buf, cap);
      if (!nb) {
        free(buf);
        fclose(f);
        return ts_errorf(err, TS_ENOMEM, "%s: out of memory", path);
      }
      buf = nb;
    }
    size_t r = fread(buf + n, 1, 4096, f);
    n += r;
    if (r < 4096) break;
  }
  int bad = ferror(f);
  fclose(f);
  if (bad) {
    free(buf);
    return ts_errorf(err, TS_EIO, "%s: read error", path);
  }
  buf[n] = '\0';
  *out = buf;
  *len = n;
  return TS_OK;
}

static int path_join(char *dst, size_t cap, const char *dir, const char *name, ts_err *err) {
  int n = snprintf(dst, cap, "%s/%s", dir, name);
  if (n < 0 || (size_t)n >= cap) return ts_errorf(err, TS_EINVAL, "%s: path too long", dir);
  return TS_OK;
}

static int file_exists(const char *p) {
  struct stat sb;
  return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

static int add_st(model_files *mf, const char *path, ts_err *err) {
  st_file **ns = realloc(mf->st, (size_t)(mf->n_st + 1) * sizeof *ns);
  if (!ns) return ts_errorf(err, TS_ENOMEM, "out of memory");
  mf->st = ns;
  TS_TRY(st_open(&mf->st[mf->n_st], path, err));
  mf->n_st++;
  return TS_OK;
}

/* model.safetensors.index.json: {"weight_map": {tensor: file}}. Opens each distinct file once and
 * checks that every mapped tensor is where the index says. */
static int open_index(model_files *mf, const char *dir, const char *index_path, ts_err *err) {
  char *txt;
  size_t len;
  TS_TRY(read_text(index_path, &txt, &len, err));
  json_error_t je;
  json_t *root = json_loadb(txt, len, 0, &je);
  free(txt);
  const char *fn = base_name(index_path);
  if (!root) return ts_errorf(err, TS_EFORMAT, "%s: not valid JSON (%s at line %d)", fn, je.text, je.line);
  int rc = TS_OK;
  json_t *wm = json_object_get(root, "weight_map");
  if (!json_is_object(wm)) {
    rc = ts_errorf(err, TS_EFORMAT, "%s: missing object 'weight_map'", fn);
    goto done;
  }
  const char *tname;
  json_t *v;
  json_object_foreach(wm, tname, v) {
    if (!json_is_string(v)) {
      rc = ts_errorf(err, TS_EFORMAT, "%s: weight_map['%s'] must be a file name", fn, tname);
      goto done;
    }
    const char *file = json_string_value(v);
    /* The index names files beside it; anything else would read outside the model directory. */
    if (!*file || strchr(file, '/') || !strcmp(file, "..") || !strcmp(file, ".")) {
      rc = ts_errorf(err, TS_EFORMAT, "%s: weight_map['%s'] = '%s' is not a plain file name", fn,
                     tname, file);
      goto done;
    }
    int idx = -1;
    for (int i = 0; i < mf->n_st; i++)
      if (!strcmp(base_name(mf->st[i]->path), file)) idx = i;
    if (idx < 0) {
      char p[4096];
      if ((rc = path_join(p, sizeof p, dir, file, err)) < 0) goto done;
      if ((rc = add_st(mf, p, err)) < 0) goto done;
      idx = mf->n_st - 1;
    }
    if (!st_find(mf->st[idx], tname)) {
      rc = ts_errorf(err, TS_EFORMAT, "%s: tensor '%s' is listed in %s but that file lacks it",
                     fn, tname, file);
      goto done;
    }
  }
  if (mf->n_st == 0) rc = ts_errorf(err, TS_EFORMAT, "%s: weight_map is empty", fn);
done:
  json_decref(root);
  return rc;
}

static int open_hf(model_files *mf, const char *dir, ts_err *err) {
  char p[4096];
  char *txt;
  size_t len;
  TS_TRY(path_join(p, sizeof p, dir, "config.json", err));
  int rc = read_text(p, &txt, &len, err);
  if (rc == TS_ENOTFOUND)
    return ts_errorf(err, TS_ENOTFOUND, "%s: no config.json (not a Hugging Face model directory)",
                     dir);
  TS_TRY(rc);
  rc = config_from_hf_json(&mf->cfg, txt, len, "config.json", err);
  free(txt);
  TS_TRY(rc);
  TS_TRY(path_join(p, sizeof p, dir, "generation_config.json", err));
  if (file_exists(p)) {
    TS_TRY(read_text(p, &txt, &len, err));
    rc = config_apply_generation_json(&mf->cfg, txt, len, "generation_config.json", err);
    free(txt);
    TS_TRY(rc);
  }
  TS_TRY(path_join(p, sizeof p, dir, "model.safetensors.index.json", err));
  if (file_exists(p)) return open_index(mf, dir, p, err);
  TS_TRY(path_join(p, sizeof p, dir, "model.safetensors", err));
  if (!file_exists(p))
    return ts_errorf(err, TS_ENOTFOUND,
                     "%s: no model.safetensors or model.safetensors.index.json", dir);
  return add_st(mf, p, err);
}

int model_files_open(model_files **out, const char *path, ts_err *err) {
  *out = NULL;
  struct stat sb;
  if (stat(path, &sb) < 0)
    return ts_errorf(err, TS_ENOTFOUND, "%s: no such model file or directory", path);
  model_files *mf = calloc(1, sizeof *mf);
  if (!mf || !(mf->path = strdup(path))) {
    free(mf);
    return ts_errorf(err, TS_ENOMEM, "out of memory");
  }
  int rc;
  if (S_ISDIR(sb.st_mode)) {
    mf->fmt = MODEL_FMT_HF;
    rc = open_hf(mf, path, err);
  } else {
    mf->fmt = MODEL_FMT_GGUF;
    rc = gguf_open(&mf->gguf, path, err);
    if (rc == TS_OK) rc = config_from_gguf(&mf->cfg, mf->gguf, err);
  }
  if (rc < 0) {
    model_files_close(mf);
    return rc;
  }
  *out = mf;
  return TS_OK;
}

void model_files_close(model_files *mf) {
  if (!mf) return;
  for (int i = 0; i < mf->n_st; i++) st_close(mf->st[i]);
  free(mf->st);
  gguf_close(mf->gguf);
  free(mf->path);
  free(mf);
}

model_format model_files_format(const model_files *mf) { return mf->fmt; }
const char *model_files_path(const model_files *mf) { return mf->path; }
const model_config *model_files_config(const model_files *mf) { return &mf->cfg; }
const struct gguf_file *model_files_gguf(const model_files *mf) { return mf->gguf; }

/* Full view of a tensor. *dtype_name is set for unsupported dtypes (for the error line). */
static int find_raw(const model_files *mf, const char *name, ts_tensor *out, const char **file,
                    const char **dtype_name) {
  memset(out, 0, sizeof *out);
  if (dtype_name) *dtype_name = NULL;
  if (mf->fmt == MODEL_FMT_GGUF) {
    const gguf_tensor *t = gguf_find_tensor(mf->gguf, name);
    if (!t) return TS_ENOTFOUND;
    if (file) *file = mf->gguf->path;
    out->data = (void *)t->data;
    out->dtype = t->dtype;
    out->ndim = t->ndim;
    for (int i = 0; i < t->ndim; i++) out->shape[i] = t->ne[t->ndim - 1 - i];
    out->row_stride = out->shape[out->ndim - 1];
    if (t->dtype == TS_DTYPE_COUNT && dtype_name) *dtype_name = "(unknown ggml type)";
    return TS_OK;
  }
  for (int i = 0; i < mf->n_st; i++) {
    const st_tensor *t = st_find(mf->st[i], name);
    if (!t) continue;
    if (file) *file = mf->st[i]->path;
    out->data = (void *)t->data;
    out->dtype = t->dtype;
    out->ndim = t->ndim;
    for (int k = 0; k < t->ndim; k++) out->shape[k] = t->shape[k];
    out->row_stride = t->ndim ? t->shape[t->ndim - 1] : 1;
    if (t->dtype == ST_DTYPE_UNSUPPORTED && dtype_name) *dtype_name = t->dtype_name;
    return TS_OK;
  }
  return TS_ENOTFOUND;
}

int model_files_find_tensor(const model_files *mf, const char *name, ts_tensor *out,
                            const char **file_of_tensor) {
  return find_raw(mf, name, out, file_of_tensor, NULL);
}

/* ---- weights ---- */

typedef enum { SPLIT_NONE, SPLIT_ROWS, SPLIT_COLS } split_kind;

typedef struct {
  model_files *mf;
  const model_shard *sh;
  ts_err *err;
} loader;

static void fmt_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
  size_t n = (size_t)snprintf(buf, cap, "[");
  for (int i = 0; i < ndim && n < cap; i++)
    n += (size_t)snprintf(buf + n, cap - n, "%s%lld", i ? ", " : "", (long long)shape[i]);
  if (n < cap) snprintf(buf + n, cap - n, "]");
}

/* Looks a tensor up, checks presence, dtype and the exact full shape, then narrows it to this
 * rank's slice: rows [r0, r0+nr) of dim 0, or columns [r0, r0+nr) of dim 1 keeping the file's
 * row stride. optional: an absent tensor leaves *out empty. */
static int get_weight(loader *L, const char *name, int optional, int ndim, int64_t d0, int64_t d1,
                      split_kind split, int64_t parts, int64_t part, ts_tensor *out) {
  model_files *mf = L->mf;
  const char *file = mf->path, *bad_dtype;
  memset(out, 0, sizeof *out);
  int rc = find_raw(mf, name, out, &file, &bad_dtype);
  if (rc == TS_ENOTFOUND) {
    if (optional) return TS_OK;
    const char *where = mf->fmt == MODEL_FMT_GGUF ? base_name(mf->path)
                        : mf->n_st == 1           ? base_name(mf->st[0]->path)
                                                  : "model.safetensors.index.json";
    return ts_errorf(L->err, TS_ENOTFOUND, "%s: missing tensor '%s'", where, name);
  }
  const char *bn = base_name(file);
  if (bad_dtype || out->dtype == TS_I32 || out->dtype >= TS_DTYPE_COUNT)
    return ts_errorf(L->err, TS_EUNSUPPORTED,
                     "%s: tensor '%s' has unsupported dtype %s (supported: F32, F16, BF16%s)", bn,
                     name, bad_dtype ? bad_dtype : ts_dtype_table[out->dtype].name,
                     mf->fmt == MODEL_FMT_GGUF ? ", Q8_0, Q4_0, Q4_K, Q6_K" : "");
  /* Kernels read elements in place, so a view must sit on its element alignment (writers pad
   * the safetensors header to 8 bytes; GGUF aligns its data section). */
  size_t align = ts_dtype_table[out->dtype].block_elems == 1
                     ? (size_t)ts_dtype_table[out->dtype].block_bytes : 2;
  if ((uintptr_t)out->data % align)
    return ts_errorf(L->err, TS_EUNSUPPORTED,
                     "%s: tensor '%s' data is not %zu-byte aligned in the file", bn, name, align);
  int64_t want[2] = {d0, d1};
  int same = out->ndim == ndim;
  for (int i = 0; same && i < ndim; i++) same = out->shape[i] == want[i];
  if (!same) {
    char got[96], exp[96];
    fmt_shape(got, sizeof got, out->ndim, out->shape);
    fmt_shape(exp, sizeof exp, ndim, want);
    return ts_errorf(L->err, TS_EFORMAT, "%s: tensor '%s' has shape %s, expected %s", bn, name,
                     got, exp);
  }
  int blk = ts_dtype_table[out->dtype].block_elems;
  if (split == SPLIT_ROWS) {
    int64_t n = d0 / parts, row_elems = ndim == 2 ? d1 : 1;
    out->data = (char *)out->data + ts_dtype_bytes(out->dtype, part * n * row_elems);
    out->shape[0] = n;
  } else if (split == SPLIT_COLS) {
    int64_t n = d1 / parts;
    if ((part * n) % blk)
      return ts_errorf(L->err, TS_EUNSUPPORTED,
                       "%s: tensor '%s': a column split at %lld is not on a %s block boundary",
                       bn, name, (long long)(part * n), ts_dtype_table[out->dtype].name);
    out->data = (char *)out->data + ts_dtype_bytes(out->dtype, part * n);
    out->shape[1] = n;
    out->row_stride = d1;
  }
  return TS_OK;
}

/* Tensor names of one layer, per format. */
enum { W_ATTN_NORM, W_Q, W_K, W_V, W_BQ, W_BK, W_BV, W_QN, W_KN, W_O, W_FFN_NORM, W_GATE, W_UP,
       W_DOWN, W_COUNT };
static const char *hf_names[W_COUNT] = {
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
    "self_attn.v_proj.bias", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "mlp.down_proj.weight"};
static const char *gguf_names[W_COUNT] = {
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_q.bias",
    "attn_k.bias", "attn_v.bias", "attn_q_norm.weight", "attn_k_norm.weight",
    "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
    "ffn_down.weight"};

static int load_layer(loader *L, int l, layer_weights *lw) {
  const model_config *c = &L->mf->cfg;
  int gguf = L->mf->fmt == MODEL_FMT_GGUF;
  int64_t tp = L->sh->tp_size, r = L->sh->tp_rank;
  int64_t q_rows = (int64_t)c->n_head * c->head_dim, kv_rows = (int64_t)c->n_kv_head * c->head_dim;
  int64_t d = c->d_model, ff = c->d_ff;
  char nm[W_COUNT][160];
  for (int i = 0; i < W_COUNT; i++)
    snprintf(nm[i], sizeof nm[i], gguf ? "blk.%d.%s" : "model.layers.%d.%s", l,
             gguf ? gguf_names[i] : hf_names[i]);
  TS_TRY(get_weight(L, nm[W_ATTN_NORM], 0, 1, d, 0, SPLIT_NONE, tp, r, &lw->attn_norm));
  TS_TRY(get_weight(L, nm[W_Q], 0, 2, q_rows, d, SPLIT_ROWS, tp, r, &lw->wq));
  TS_TRY(get_weight(L, nm[W_K], 0, 2, kv_rows, d, SPLIT_ROWS, tp, r, &lw->wk));
  TS_TRY(get_weight(L, nm[W_V], 0, 2, kv_rows, d, SPLIT_ROWS, tp, r, &lw->wv));
  if (c->qkv_bias) {
    TS_TRY(get_weight(L, nm[W_BQ], 0, 1, q_rows, 0, SPLIT_ROWS, tp, r, &lw->bq));
    TS_TRY(get_weight(L, nm[W_BK], 0, 1, kv_rows, 0, SPLIT_ROWS, tp, r, &lw->bk));
    TS_TRY(get_weight(L, nm[W_BV], 0, 1, kv_rows, 0, SPLIT_ROWS, tp, r, &lw->bv));
  }
  if (c->qk_norm) {
    TS_TRY(get_weight(L, nm[W_QN], 0, 1, c->head_dim, 0, SPLIT_NONE, tp, r, &lw->q_norm));
    TS_TRY(get_weight(L, nm[W_KN], 0, 1, c->head_dim, 0, SPLIT_NONE, tp, r, &lw->k_norm));
  }
  TS_TRY(get_weight(L, nm[W_O], 0, 2, d, q_rows, SPLIT_COLS, tp, r, &lw->wo));
  TS_TRY(get_weight(L, nm[W_FFN_NORM], 0, 1, d, 0, SPLIT_NONE, tp, r, &lw->ffn_norm));
  TS_TRY(get_weight(L, nm[W_GATE], 0, 2, ff, d, SPLIT_ROWS, tp, r, &lw->w_gate));
  TS_TRY(get_weight(L, nm[W_UP], 0, 2, ff, d, SPLIT_ROWS, tp, r, &lw->w_up));
  TS_TRY(get_weight(L, nm[W_DOWN], 0, 2, d, ff, SPLIT_COLS, tp, r, &lw->w_down));
  return TS_OK;
}

int model_files_load_weights(model_files *mf, const model_shard *shard, model_weights *w,
                             ts_err *err) {
  memset(w, 0, sizeof *w);
  const model_config *c = &mf->cfg;
  TS_TRY(model_shard_validate(c, shard, err));
  loader L = {mf, shard, err};
  int gguf = mf->fmt == MODEL_FMT_GGUF;
  int first = model_shard_is_first(shard), last = model_shard_is_last(shard);
  const char *embd = gguf ? "token_embd.weight" : "model.embed_tokens.weight";
  int rc = TS_OK;
  if (first || (last && c->tie_embeddings))
    rc = get_weight(&L, embd, 0, 2, c->vocab_size, c->d_model, SPLIT_NONE, 1, 0, &w->tok_embd);
  if (rc == TS_OK && last) {
    rc = get_weight(&L, gguf ? "output_norm.weight" : "model.norm.weight", 0, 1, c->d_model, 0,
                    SPLIT_NONE, 1, 0, &w->out_norm);
    if (rc == TS_OK && c->tie_embeddings) w->lm_head = w->tok_embd;
    else if (rc == TS_OK)
      rc = get_weight(&L, gguf ? "output.weight" : "lm_head.weight", 0, 2, c->vocab_size,
                      c->d_model, SPLIT_NONE, 1, 0, &w->lm_head);
  }
  if (rc < 0) {
    memset(w, 0, sizeof *w);
    return rc;
  }
  w->n_layers = shard->layer_end - shard->layer_start;
  w->layers = calloc((size_t)w->n_layers, sizeof *w->layers);
  if (!w->layers) return ts_errorf(err, TS_ENOMEM, "out of memory for %d layers", w->n_layers);
  for (int i = 0; i < w->n_layers && rc == TS_OK; i++)
    rc = load_layer(&L, shard->layer_start + i, &w->layers[i]);
  if (rc < 0) model_weights_free(w);
  return rc;
}

void model_weights_free(model_weights *w) {
  if (!w) return;
  free(w->layers);
  memset(w, 0, sizeof *w);
}

/* ---- fingerprint ---- */

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  const uint8_t *b = p;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

static uint64_t fnv_i64(uint64_t h, int64_t v) { return fnv(h, &v, sizeof v); }

static uint64_t fnv_tensor(uint64_t h, const char *name, int dtype, int ndim, const int64_t *dims) {
  h = fnv(h, name, strlen(name) + 1);
  h = fnv_i64(h, dtype);
  for (int i = 0; i < ndim; i++) h = fnv_i64(h, dims[i]);
  return h;
}

uint64_t model_files_fingerprint(const model_files *mf) {
  const model_config *c = &mf->cfg;
  uint64_t h = 0xcbf29ce484222325ull;
  int64_t ints[] = {c->arch, c->vocab_size, c->d_model, c->n_layer, c->n_head, c->n_kv_head,
                    c->head_dim, c->d_ff, c->max_pos, c->rope_scaling, c->rope_orig_max_pos,
                    c->rope_interleaved, c->tie_embeddings, c->qkv_bias, c->qk_norm, mf->fmt};
  for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) h = fnv_i64(h, ints[i]);
  float fl[] = {c->rms_eps, c->rope_theta, c->rope_factor, c->rope_low_freq_factor,
                c->rope_high_freq_factor};
  h = fnv(h, fl, sizeof fl);
  if (mf->gguf) {
    for (uint64_t i = 0; i < mf->gguf->n_tensors; i++) {
      const gguf_tensor *t = &mf->gguf->tensors[i];
      h = fnv_tensor(h, t->name, (int)t->ggml_type, t->ndim, t->ne);
      h = fnv_i64(h, (int64_t)t->offset);
    }
  }
  /* Each safetensors file's table is sorted by name, and files are opened in index order. */
  for (int f = 0; f < mf->n_st; f++)
    for (int i = 0; i < mf->st[f]->n_tensors; i++) {
      const st_tensor *t = &mf->st[f]->tensors[i];
      h = fnv_tensor(h, t->name, (int)t->dtype, t->ndim, t->shape);
      h = fnv_i64(h, (int64_t)t->begin);
    }
  return h;
}
