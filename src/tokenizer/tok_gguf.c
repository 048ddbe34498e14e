/* GGUF vocabularies (tokenizer.ggml.*): "llama" becomes SentencePiece BPE by scores with byte
 * fallback (llama.cpp's SPM tokenizer), "gpt2" byte-level BPE with merges and the pre-tokenizer
 * regex named by tokenizer.ggml.pre. Control/unknown tokens are special added tokens,
 * user-defined ones non-special added tokens. */
#include <stdlib.h>
#include <string.h>

#include "model/gguf.h"
#include "tokenizer/tok_internal.h"

static const char QWEN2_RE[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char LLAMA3_RE[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char GPT2_RE[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

enum {
  GGUF_TOK_NORMAL = 1,
  GGUF_TOK_UNKNOWN = 2,
  GGUF_TOK_CONTROL = 3,
  GGUF_TOK_USER = 4,
  GGUF_TOK_UNUSED = 5, /* a placeholder such as [PAD151691]: no text, never matched */
};

/* Numeric array element i as int64/double, bounds-checked against the mapping. */
static int arr_num(const gguf_file *g, const gguf_kv *kv, uint64_t i, double *out) {
  static const int size[GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
  if (kv->type != GGUF_TYPE_ARRAY || kv->arr_type >= GGUF_TYPE_COUNT || !size[kv->arr_type]) return TS_EFORMAT;
  const uint8_t *p = (const uint8_t *)kv->arr_data + i * (uint64_t)size[kv->arr_type];
  if (i >= kv->arr_len || p < g->map || p + size[kv->arr_type] > g->map + g->size) return TS_ERANGE;
  union { uint8_t u8; int8_t i8; uint16_t u16; int16_t i16; uint32_t u32; int32_t i32; float f;
          uint64_t u64; int64_t i64; double d; } u;
  memcpy(&u, p, (size_t)size[kv->arr_type]);
  switch (kv->arr_type) {
    case GGUF_TYPE_UINT8: case GGUF_TYPE_BOOL: *out = u.u8; break;
    case GGUF_TYPE_INT8: *out = u.i8; break;
    case GGUF_TYPE_UINT16: *out = u.u16; break;
    case GGUF_TYPE_INT16: *out = u.i16; break;
    case GGUF_TYPE_UINT32: *out = u.u32; break;
    case GGUF_TYPE_INT32: *out = u.i32; break;
    case GGUF_TYPE_FLOAT32: *out = u.f; break;
    case GGUF_TYPE_UINT64: *out = (double)u.u64; break;
    case GGUF_TYPE_INT64: *out = (double)u.i64; break;
    default: *out = u.d; break;
  }
  return 0;
}

static int add_norm(struct tokenizer *t, tok_norm_kind k, const char *a, const char *b) {
  tok_norm *n = &t->norms[t->n_norms++];
  memset(n, 0, sizeof *n);
  n->kind = k;
  if (a && !(n->a = tok_strndup(a, n->alen = strlen(a)))) return TS_ENOMEM;
  if (b && !(n->b = tok_strndup(b, n->blen = strlen(b)))) return TS_ENOMEM;
  return 0;
}

static int add_dec(struct tokenizer *t, tok_dec_kind k, const char *a, const char *b) {
  tok_dec *d = &t->decs[t->n_decs++];
  memset(d, 0, sizeof *d);
  d->kind = k;
  if (a && !(d->a = tok_strndup(a, d->alen = strlen(a)))) return TS_ENOMEM;
  if (b && !(d->b = tok_strndup(b, d->blen = strlen(b)))) return TS_ENOMEM;
  return 0;
}

static int get_id(const gguf_file *g, const char *key, int32_t n, int32_t *out) {
  uint64_t v;
  if (gguf_get_u64(g, key, &v) == 0 && v < (uint64_t)n) *out = (int32_t)v;
  return 0;
}

static int load(struct tokenizer *t, const gguf_file *g, ts_err *err) {
  gguf_str model;
  if (gguf_get_str(g, "tokenizer.ggml.model", &model))
    return ts_errorf(err, TS_EFORMAT, "no tokenizer.ggml.model");
  int llama = model.len == 5 && !memcmp(model.ptr, "llama", 5);
  int gpt2 = model.len == 4 && !memcmp(model.ptr, "gpt2", 4);
  if (!llama && !gpt2)
    return ts_errorf(err, TS_EUNSUPPORTED, "unsupported tokenizer.ggml.model '%.*s'",
                     (int)(model.len > 40 ? 40 : model.len), model.ptr);
  const gguf_kv *tk = gguf_find_kv(g, "tokenizer.ggml.tokens");
  if (!tk || tk->type != GGUF_TYPE_ARRAY || tk->arr_type != GGUF_TYPE_STRING || tk->arr_len == 0 ||
      tk->arr_len > (1u << 24))
    return ts_errorf(err, TS_EFORMAT, "tokenizer.ggml.tokens is missing or not a string list");
  int32_t n = (int32_t)tk->arr_len;
  gguf_str *strs = malloc((size_t)n * sizeof *strs);
  if (!strs) return TS_ENOMEM;
  int rc = gguf_arr_strs(g, tk, strs, err);
  if (!rc) rc = tok_alloc_ids(t, n, llama);
  const gguf_kv *tt = gguf_find_kv(g, "tokenizer.ggml.token_type");
  const gguf_kv *sc = gguf_find_kv(g, "tokenizer.ggml.scores");
  if (!rc && tt && tt->arr_len != (uint64_t)n) rc = ts_errorf(err, TS_EFORMAT, "token_type length differs from tokens");
  if (!rc && llama && (!sc || sc->arr_len != (uint64_t)n))
    rc = ts_errorf(err, TS_EFORMAT, "tokenizer.ggml.scores is missing or has the wrong length");
  if (!rc) {
    t->added = calloc((size_t)n, sizeof *t->added);
    if (!t->added) rc = TS_ENOMEM;
  }
  tok_buf clean = {0};
  for (int32_t i = 0; i < n && !rc; i++) {
    clean.len = 0;
    rc = tok_utf8_lossy(&clean, strs[i].ptr, strs[i].len); /* pieces are text; keep them valid */
    double v = GGUF_TOK_NORMAL;
    if (!rc && tt && (rc = arr_num(g, tt, (uint64_t)i, &v))) rc = ts_errorf(err, rc, "bad token_type[%d]", i);
    /* An unused id decodes to nothing, as an id outside tokenizer.json's vocabulary does. */
    if (!rc && v != GGUF_TOK_UNUSED) rc = tok_set_mpiece(t, i, clean.p ? clean.p : "", clean.len);
    if (!rc && llama) {
      double s;
      if ((rc = arr_num(g, sc, (uint64_t)i, &s))) rc = ts_errorf(err, rc, "bad scores[%d]", i);
      t->scores[i] = (float)s;
    }
    if (!rc && (v == GGUF_TOK_CONTROL || v == GGUF_TOK_USER || v == GGUF_TOK_UNKNOWN)) {
      tok_added *a = &t->added[t->n_added];
      a->id = i;
      a->special = v != GGUF_TOK_USER;
      if (!(a->content = tok_strndup(clean.p ? clean.p : "", clean.len))) rc = TS_ENOMEM;
      a->len = clean.len;
      t->n_added++;
    }
  }
  tok_buf_free(&clean);
  free(strs);
  if (rc) return rc;

  t->unk_id = -1;
  t->bos_id = t->eos_id = -1;
  get_id(g, "tokenizer.ggml.bos_token_id", n, &t->bos_id);
  get_id(g, "tokenizer.ggml.eos_token_id", n, &t->eos_id);
  int add_bos = llama, add_eos = 0, space_prefix = 1;
  gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &add_bos);
  gguf_get_bool(g, "tokenizer.ggml.add_eos_token", &add_eos);
  gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &space_prefix);

  if (llama) {
    t->model = TOK_MODEL_SPM;
    t->byte_fallback = 1;
    t->unk_id = 0;
    get_id(g, "tokenizer.ggml.unknown_token_id", n, &t->unk_id);
    if (space_prefix) TS_TRY(add_norm(t, TOK_NORM_PREPEND, "\xE2\x96\x81", NULL));
    TS_TRY(add_norm(t, TOK_NORM_REPLACE, " ", "\xE2\x96\x81"));
    t->has_decoder = 1;
    TS_TRY(add_dec(t, TOK_DEC_REPLACE, "\xE2\x96\x81", " "));
    TS_TRY(add_dec(t, TOK_DEC_BYTEFALLBACK, NULL, NULL));
    TS_TRY(add_dec(t, TOK_DEC_FUSE, NULL, NULL));
    if (space_prefix) {
      TS_TRY(add_dec(t, TOK_DEC_STRIP, " ", NULL));
      t->decs[t->n_decs - 1].start = 1;
    }
  } else {
    t->model = TOK_MODEL_BPE;
    gguf_str pre = {"", 0};
    gguf_get_str(g, "tokenizer.ggml.pre", &pre);
    const char *re = GPT2_RE;
    if (pre.len == 5 && !memcmp(pre.ptr, "qwen2", 5)) {
      re = QWEN2_RE;
      TS_TRY(add_norm(t, TOK_NORM_NFC, NULL, NULL));
    } else if ((pre.len == 9 && !memcmp(pre.ptr, "llama-bpe", 9)) || (pre.len == 6 && !memcmp(pre.ptr, "llama3", 6))) {
      re = LLAMA3_RE;
      t->ignore_merges = 1;
    }
    tok_pre *p = &t->pres[t->n_pres++];
    memset(p, 0, sizeof *p);
    p->kind = TOK_PRE_SPLIT;
    p->behavior = TOK_SPLIT_ISOLATED;
    TS_TRY(tok_regex_compile(&p->re, re, strlen(re), err));
    p = &t->pres[t->n_pres++];
    memset(p, 0, sizeof *p);
    p->kind = TOK_PRE_BYTELEVEL;
    t->has_decoder = 1;
    TS_TRY(add_dec(t, TOK_DEC_BYTELEVEL, NULL, NULL));

    const gguf_kv *mk = gguf_find_kv(g, "tokenizer.ggml.merges");
    if (!mk || mk->type != GGUF_TYPE_ARRAY || mk->arr_type != GGUF_TYPE_STRING || mk->arr_len > (1u << 24))
      return ts_errorf(err, TS_EFORMAT, "tokenizer.ggml.merges is missing or not a string list");
    gguf_str *ms = malloc((mk->arr_len + 1) * sizeof *ms);
    if (!ms) return TS_ENOMEM;
    rc = gguf_arr_strs(g, mk, ms, err);
    if (!rc) rc = tok_strmap_init(&t->vocab, (size_t)n, t->mpieces, t->mpiece_len);
    if (!rc) rc = tok_mergemap_init(&t->merges, (size_t)mk->arr_len);
    for (int32_t id = 0; !rc && id < n; id++) tok_strmap_put(&t->vocab, id);
    tok_buf cat = {0};
    for (uint64_t i = 0; !rc && i < mk->arr_len; i++) {
      const char *sp = memchr(ms[i].ptr, ' ', ms[i].len);
      if (!sp) {
        rc = ts_errorf(err, TS_EFORMAT, "tokenizer.ggml.merges[%llu] is not a pair", (unsigned long long)i);
        break;
      }
      size_t ll = (size_t)(sp - ms[i].ptr), rl = ms[i].len - ll - 1;
      int32_t li = tok_strmap_get(&t->vocab, ms[i].ptr, ll), ri = tok_strmap_get(&t->vocab, sp + 1, rl);
      cat.len = 0;
      if (tok_buf_put(&cat, ms[i].ptr, ll) || tok_buf_put(&cat, sp + 1, rl)) rc = TS_ENOMEM;
      int32_t ni = rc ? -1 : tok_strmap_get(&t->vocab, cat.p, cat.len);
      if (!rc && (li < 0 || ri < 0 || ni < 0))
        rc = ts_errorf(err, TS_EFORMAT, "tokenizer.ggml.merges[%llu]: a token is not in the vocabulary",
                       (unsigned long long)i);
      if (!rc) rc = tok_mergemap_put(&t->merges, li, ri, (int32_t)i, ni);
    }
    tok_buf_free(&cat);
    free(ms);
    tok_strmap_free(&t->vocab);
    if (rc) return rc;
  }
  TS_TRY(tok_finalize(t, err));
  if (add_bos && t->bos_id >= 0) {
    if (!(t->prefix_ids = malloc(sizeof *t->prefix_ids))) return TS_ENOMEM;
    t->prefix_ids[t->n_prefix++] = t->bos_id;
  }
  if (add_eos && t->eos_id >= 0) {
    if (!(t->suffix_ids = malloc(sizeof *t->suffix_ids))) return TS_ENOMEM;
    t->suffix_ids[t->n_suffix++] = t->eos_id;
  }
  static const char *eos_keys[] = {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                   "tokenizer.ggml.eom_token_id"};
  for (size_t k = 0; k < sizeof eos_keys / sizeof eos_keys[0]; k++) {
    int32_t id = -1;
    get_id(g, eos_keys[k], n, &id);
    int dup = id < 0;
    for (int i = 0; i < t->n_eos_ids && !dup; i++) dup = t->eos_ids[i] == id;
    if (dup) continue;
    int32_t *p = realloc(t->eos_ids, (size_t)(t->n_eos_ids + 1) * sizeof *p);
    if (!p) return TS_ENOMEM;
    t->eos_ids = p;
    p[t->n_eos_ids++] = id;
  }
  if (t->bos_id >= 0 && !(t->bos_token = tok_strndup(t->pieces[t->bos_id], t->piece_len[t->bos_id]))) return TS_ENOMEM;
  if (t->eos_id >= 0 && !(t->eos_token = tok_strndup(t->pieces[t->eos_id], t->piece_len[t->eos_id]))) return TS_ENOMEM;
  gguf_str ct;
  if (gguf_get_str(g, "tokenizer.chat_template", &ct) == 0 &&
      !(t->chat_template = tok_strndup(ct.ptr, ct.len)))
    return TS_ENOMEM;
  return 0;
}

int tok_load_gguf(tokenizer **out, const struct gguf_file *g, ts_err *err) {
  struct tokenizer *t = calloc(1, sizeof *t);
  if (!t) return ts_errorf(err, TS_ENOMEM, "out of memory");
  ts_err_clear(err);
  int rc = load(t, g, err);
  if (rc) {
    if (err && !err->msg[0]) ts_errorf(err, rc, "%s", ts_strerror(rc));
    ts_err_prefix(err, "%s", g->path ? g->path : "gguf");
    tok_free(t);
    return rc;
  }
  *out = t;
  return 0;
}

int tok_load_gguf_path(tokenizer **out, const char *path, ts_err *err);
int tok_load_gguf_path(tokenizer **out, const char *path, ts_err *err) {
  gguf_file *g;
  TS_TRY(gguf_open(&g, path, err));
  int rc = tok_load_gguf(out, g, err);
  gguf_close(g);
  return rc;
}
