/* Hugging Face tokenizer loading: tokenizer.json (BPE model, normalizers, pre-tokenizers,
 * post-processor, decoders, added tokens) plus tokenizer_config.json and generation_config.json. */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"

static int read_file(const char *path, char **buf, size_t *len, ts_err *err) {
  FILE *f = fopen(path, "rb");
  if (!f) return ts_errorf(err, errno == ENOENT ? TS_ENOTFOUND : TS_EIO, "%s: %s", path, strerror(errno));
  tok_buf b = {0};
  char chunk[65536];
  size_t n;
  int rc = 0;
  while (!rc && (n = fread(chunk, 1, sizeof chunk, f)) > 0) rc = tok_buf_put(&b, chunk, n);
  int bad = ferror(f);
  fclose(f);
  if (rc || bad) {
    tok_buf_free(&b);
    return ts_errorf(err, rc ? rc : TS_EIO, "%s: read failed", path);
  }
  if (!b.p && tok_buf_reserve(&b, 1)) return ts_errorf(err, TS_ENOMEM, "%s: out of memory", path);
  *buf = b.p;
  *len = b.len;
  return 0;
}

static int jbool(const json_t *o, const char *key, int dflt) {
  const json_t *v = json_object_get(o, key);
  return json_is_boolean(v) ? json_is_true(v) : dflt;
}

static const char *jstr(const json_t *o, const char *key) {
  return json_string_value(json_object_get(o, key));
}

/* A pattern object {"String": s} or {"Regex": r}; *is_regex tells which. */
static const char *jpattern(const json_t *o, int *is_regex, size_t *len) {
  const json_t *p = json_object_get(o, "pattern");
  const json_t *v = json_object_get(p, "String");
  *is_regex = 0;
  if (!json_is_string(v)) {
    v = json_object_get(p, "Regex");
    *is_regex = 1;
  }
  if (!json_is_string(v)) return NULL;
  *len = json_string_length(v);
  return json_string_value(v);
}

static int dup2(char **dst, size_t *dlen, const char *s, size_t n) {
  *dst = tok_strndup(s, n);
  if (dlen) *dlen = n;
  return *dst ? 0 : TS_ENOMEM;
}

static int load_normalizer(struct tokenizer *t, const json_t *n, ts_err *err) {
  if (!n || json_is_null(n)) return 0;
  const char *type = jstr(n, "type");
  if (!type) return ts_errorf(err, TS_EFORMAT, "normalizer without a type");
  if (!strcmp(type, "Sequence")) {
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(n, "normalizers"), i, c) TS_TRY(load_normalizer(t, c, err));
    return 0;
  }
  if (t->n_norms == TOK_MAX_STEPS) return ts_errorf(err, TS_EUNSUPPORTED, "too many normalizers");
  tok_norm *nm = &t->norms[t->n_norms];
  memset(nm, 0, sizeof *nm);
  if (!strcmp(type, "NFC")) nm->kind = TOK_NORM_NFC;
  else if (!strcmp(type, "NFD")) nm->kind = TOK_NORM_NFD;
  else if (!strcmp(type, "NFKC")) nm->kind = TOK_NORM_NFKC;
  else if (!strcmp(type, "NFKD")) nm->kind = TOK_NORM_NFKD;
  else if (!strcmp(type, "Prepend")) {
    const json_t *p = json_object_get(n, "prepend");
    if (!json_is_string(p)) return ts_errorf(err, TS_EFORMAT, "Prepend normalizer without 'prepend'");
    nm->kind = TOK_NORM_PREPEND;
    if (dup2(&nm->a, &nm->alen, json_string_value(p), json_string_length(p))) return TS_ENOMEM;
  } else if (!strcmp(type, "Replace")) {
    int is_re;
    size_t plen;
    const char *pat = jpattern(n, &is_re, &plen);
    const json_t *c = json_object_get(n, "content");
    if (!pat || is_re || !json_is_string(c))
      return ts_errorf(err, TS_EUNSUPPORTED, "Replace normalizer: only string patterns are supported");
    nm->kind = TOK_NORM_REPLACE;
    if (dup2(&nm->a, &nm->alen, pat, plen) ||
        dup2(&nm->b, &nm->blen, json_string_value(c), json_string_length(c)))
      return TS_ENOMEM;
  } else {
    return ts_errorf(err, TS_EUNSUPPORTED, "unsupported normalizer '%s'", type);
  }
  t->n_norms++;
  return 0;
}

static const char GPT2_REGEX[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int load_pretok(struct tokenizer *t, const json_t *p, ts_err *err) {
  if (!p || json_is_null(p)) return 0;
  const char *type = jstr(p, "type");
  if (!type) return ts_errorf(err, TS_EFORMAT, "pre_tokenizer without a type");
  if (!strcmp(type, "Sequence")) {
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(p, "pretokenizers"), i, c) TS_TRY(load_pretok(t, c, err));
    return 0;
  }
  if (t->n_pres == TOK_MAX_STEPS) return ts_errorf(err, TS_EUNSUPPORTED, "too many pre-tokenizers");
  tok_pre *pr = &t->pres[t->n_pres];
  memset(pr, 0, sizeof *pr);
  if (!strcmp(type, "Split")) {
    int is_re;
    size_t plen;
    const char *pat = jpattern(p, &is_re, &plen);
    if (!pat) return ts_errorf(err, TS_EFORMAT, "Split pre-tokenizer without a pattern");
    const char *beh = jstr(p, "behavior");
    if (!beh || !strcmp(beh, "Isolated")) pr->behavior = TOK_SPLIT_ISOLATED;
    else if (!strcmp(beh, "Removed")) pr->behavior = TOK_SPLIT_REMOVED;
    else if (!strcmp(beh, "MergedWithPrevious")) pr->behavior = TOK_SPLIT_MERGED_PREV;
    else if (!strcmp(beh, "MergedWithNext")) pr->behavior = TOK_SPLIT_MERGED_NEXT;
    else if (!strcmp(beh, "Contiguous")) pr->behavior = TOK_SPLIT_CONTIGUOUS;
    else return ts_errorf(err, TS_EUNSUPPORTED, "unsupported Split behavior '%s'", beh);
    pr->invert = jbool(p, "invert", 0);
    pr->kind = TOK_PRE_SPLIT;
    if (is_re) {
      TS_TRY(tok_regex_compile(&pr->re, pat, plen, err));
    } else {
      tok_buf q = {0};
      int rc = 0;
      for (size_t i = 0; i < plen && !rc; i++) {
        unsigned char c = (unsigned char)pat[i];
        if (c < 0x80 && !((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')))
          rc = tok_buf_putc(&q, '\\');
        if (!rc) rc = tok_buf_putc(&q, (char)c);
      }
      if (!rc) rc = tok_regex_compile(&pr->re, q.p ? q.p : "", q.len, err);
      tok_buf_free(&q);
      TS_TRY(rc);
    }
  } else if (!strcmp(type, "ByteLevel")) {
    pr->kind = TOK_PRE_BYTELEVEL;
    pr->add_prefix_space = jbool(p, "add_prefix_space", 1);
    pr->use_regex = jbool(p, "use_regex", 1);
    if (pr->use_regex && !t->re_bytelevel)
      TS_TRY(tok_regex_compile(&t->re_bytelevel, GPT2_REGEX, strlen(GPT2_REGEX), err));
  } else {
    return ts_errorf(err, TS_EUNSUPPORTED, "unsupported pre_tokenizer '%s'", type);
  }
  t->n_pres++;
  return 0;
}

static int load_decoder(struct tokenizer *t, const json_t *d, ts_err *err) {
  if (!d || json_is_null(d)) return 0;
  const char *type = jstr(d, "type");
  if (!type) return ts_errorf(err, TS_EFORMAT, "decoder without a type");
  t->has_decoder = 1;
  if (!strcmp(type, "Sequence")) {
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(d, "decoders"), i, c) TS_TRY(load_decoder(t, c, err));
    return 0;
  }
  if (t->n_decs == TOK_MAX_STEPS) return ts_errorf(err, TS_EUNSUPPORTED, "too many decoders");
  tok_dec *dc = &t->decs[t->n_decs];
  memset(dc, 0, sizeof *dc);
  if (!strcmp(type, "ByteLevel")) dc->kind = TOK_DEC_BYTELEVEL;
  else if (!strcmp(type, "ByteFallback")) dc->kind = TOK_DEC_BYTEFALLBACK;
  else if (!strcmp(type, "Fuse")) dc->kind = TOK_DEC_FUSE;
  else if (!strcmp(type, "Replace")) {
    int is_re;
    size_t plen;
    const char *pat = jpattern(d, &is_re, &plen);
    const json_t *c = json_object_get(d, "content");
    if (!pat || is_re || !json_is_string(c))
      return ts_errorf(err, TS_EUNSUPPORTED, "Replace decoder: only string patterns are supported");
    dc->kind = TOK_DEC_REPLACE;
    if (dup2(&dc->a, &dc->alen, pat, plen)) return TS_ENOMEM;
    if (dup2(&dc->b, &dc->blen, json_string_value(c), json_string_length(c))) {
      free(dc->a); /* the step is not counted yet, so tok_free would not release it */
      dc->a = NULL;
      return TS_ENOMEM;
    }
  } else if (!strcmp(type, "Strip")) {
    const json_t *c = json_object_get(d, "content");
    const char *cs = json_string_value(c);
    int l, partial;
    if (!cs || json_string_length(c) == 0 ||
        (size_t)(l = tok_utf8_seq((const unsigned char *)cs, json_string_length(c), &partial)) !=
            json_string_length(c))
      return ts_errorf(err, TS_EFORMAT, "Strip decoder: 'content' must be one character");
    json_int_t st = json_integer_value(json_object_get(d, "start"));
    json_int_t sp = json_integer_value(json_object_get(d, "stop"));
    if (st < 0 || sp < 0 || st > 1000000 || sp > 1000000)
      return ts_errorf(err, TS_EFORMAT, "Strip decoder: bad start/stop");
    dc->kind = TOK_DEC_STRIP;
    dc->start = (int)st;
    dc->stop = (int)sp;
    if (dup2(&dc->a, &dc->alen, cs, (size_t)l)) return TS_ENOMEM;
  } else {
    return ts_errorf(err, TS_EUNSUPPORTED, "unsupported decoder '%s'", type);
  }
  t->n_decs++;
  return 0;
}

/* Id of a token string: added tokens first, then the model vocabulary (as HF token_to_id). */
static int32_t token_id(const struct tokenizer *t, const char *s, size_t n) {
  for (int i = 0; i < t->n_added; i++)
    if (t->added[i].len == n && !memcmp(t->added[i].content, s, n)) return t->added[i].id;
  return tok_strmap_get(&t->vocab, s, n);
}

static int push_ids(int32_t **v, int *n, const json_t *ids) {
  size_t i;
  json_t *x;
  json_array_foreach(ids, i, x) {
    if (!json_is_integer(x)) return TS_EFORMAT;
    int32_t *p = realloc(*v, (size_t)(*n + 1) * sizeof *p);
    if (!p) return TS_ENOMEM;
    *v = p;
    p[(*n)++] = (int32_t)json_integer_value(x);
  }
  return 0;
}

static int load_post(struct tokenizer *t, const json_t *p, ts_err *err) {
  if (!p || json_is_null(p)) return 0;
  const char *type = jstr(p, "type");
  if (!type) return ts_errorf(err, TS_EFORMAT, "post_processor without a type");
  if (!strcmp(type, "Sequence")) {
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(p, "processors"), i, c) TS_TRY(load_post(t, c, err));
    return 0;
  }
  if (!strcmp(type, "ByteLevel")) return 0; /* offsets only */
  if (strcmp(type, "TemplateProcessing"))
    return ts_errorf(err, TS_EUNSUPPORTED, "unsupported post_processor '%s'", type);
  const json_t *special = json_object_get(p, "special_tokens");
  int seen_a = 0;
  size_t i;
  json_t *item;
  json_array_foreach(json_object_get(p, "single"), i, item) {
    if (json_object_get(item, "Sequence")) {
      seen_a = 1;
      continue;
    }
    const char *name = jstr(json_object_get(item, "SpecialToken"), "id");
    if (!name) return ts_errorf(err, TS_EFORMAT, "TemplateProcessing: bad item in 'single'");
    const json_t *ids = json_object_get(json_object_get(special, name), "ids");
    if (!json_is_array(ids))
      return ts_errorf(err, TS_EFORMAT, "TemplateProcessing: special token '%s' has no ids", name);
    int rc = seen_a ? push_ids(&t->suffix_ids, &t->n_suffix, ids) : push_ids(&t->prefix_ids, &t->n_prefix, ids);
    if (rc) return ts_errorf(err, rc, "TemplateProcessing: bad ids for '%s'", name);
  }
  return 0;
}

static int load_model(struct tokenizer *t, const json_t *m, const json_t *added, ts_err *err) {
  const char *type = jstr(m, "type");
  if (type && strcmp(type, "BPE")) return ts_errorf(err, TS_EUNSUPPORTED, "unsupported model type '%s'", type);
  const json_t *vocab = json_object_get(m, "vocab");
  const json_t *merges = json_object_get(m, "merges");
  if (!json_is_object(vocab)) return ts_errorf(err, TS_EFORMAT, "model.vocab is missing");
  if (merges && !json_is_array(merges)) return ts_errorf(err, TS_EFORMAT, "model.merges is not a list");
  const json_t *drop = json_object_get(m, "dropout");
  if (json_is_number(drop) && json_number_value(drop) > 0.0)
    return ts_errorf(err, TS_EUNSUPPORTED, "BPE dropout is not supported");
  const char *pfx = jstr(m, "continuing_subword_prefix"), *sfx = jstr(m, "end_of_word_suffix");
  if ((pfx && *pfx) || (sfx && *sfx))
    return ts_errorf(err, TS_EUNSUPPORTED, "continuing_subword_prefix/end_of_word_suffix are not supported");
  t->model = TOK_MODEL_BPE;
  t->byte_fallback = jbool(m, "byte_fallback", 0);
  t->fuse_unk = jbool(m, "fuse_unk", 0);
  t->ignore_merges = jbool(m, "ignore_merges", 0);

  json_int_t max_id = -1;
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)vocab, key, v) {
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= (1 << 24))
      return ts_errorf(err, TS_EFORMAT, "model.vocab['%.40s'] is not a valid id", key);
    if (json_integer_value(v) > max_id) max_id = json_integer_value(v);
  }
  size_t i;
  json_t *a;
  json_array_foreach(added, i, a) {
    json_int_t id = json_integer_value(json_object_get(a, "id"));
    if (!json_is_integer(json_object_get(a, "id")) || id < 0 || id >= (1 << 24))
      return ts_errorf(err, TS_EFORMAT, "added_tokens[%zu] has no valid id", i);
    if (id > max_id) max_id = id;
  }
  if (max_id < 0) return ts_errorf(err, TS_EFORMAT, "the vocabulary is empty");
  if (tok_alloc_ids(t, (int32_t)max_id + 1, 0)) return ts_errorf(err, TS_ENOMEM, "out of memory");
  /* jansson keys are NUL-terminated; a vocabulary key with an embedded NUL is cut there */
  json_object_foreach((json_t *)vocab, key, v) {
    int rc = tok_set_mpiece(t, (int32_t)json_integer_value(v), key, strlen(key));
    if (rc == TS_EFORMAT) return ts_errorf(err, rc, "model.vocab: id %d is used twice", (int)json_integer_value(v));
    if (rc) return ts_errorf(err, rc, "out of memory");
  }
  if (tok_strmap_init(&t->vocab, (size_t)t->n_ids, t->mpieces, t->mpiece_len)) return TS_ENOMEM;
  for (int32_t id = 0; id < t->n_ids; id++)
    if (t->mpieces[id]) tok_strmap_put(&t->vocab, id);

  const char *unk = jstr(m, "unk_token");
  t->unk_id = -1;
  if (unk) {
    t->unk_id = tok_strmap_get(&t->vocab, unk, strlen(unk));
    if (t->unk_id < 0) return ts_errorf(err, TS_EFORMAT, "unk_token '%.40s' is not in the vocabulary", unk);
  }

  size_t n_merges = merges ? json_array_size(merges) : 0;
  if (tok_mergemap_init(&t->merges, n_merges)) return TS_ENOMEM;
  tok_buf cat = {0};
  int rc = 0;
  for (i = 0; i < n_merges && !rc; i++) {
    const json_t *mg = json_array_get(merges, i);
    const char *l = NULL, *r = NULL;
    size_t ll = 0, rl = 0;
    if (json_is_string(mg)) {
      const char *s = json_string_value(mg);
      const char *sp = strchr(s, ' ');
      if (sp) {
        l = s;
        ll = (size_t)(sp - s);
        r = sp + 1;
        rl = json_string_length(mg) - ll - 1;
      }
    } else if (json_is_array(mg) && json_array_size(mg) == 2 &&
               json_is_string(json_array_get(mg, 0)) && json_is_string(json_array_get(mg, 1))) {
      l = json_string_value(json_array_get(mg, 0));
      ll = json_string_length(json_array_get(mg, 0));
      r = json_string_value(json_array_get(mg, 1));
      rl = json_string_length(json_array_get(mg, 1));
    }
    if (!l) {
      rc = ts_errorf(err, TS_EFORMAT, "model.merges[%zu] is not a pair", i);
      break;
    }
    int32_t li = tok_strmap_get(&t->vocab, l, ll), ri = tok_strmap_get(&t->vocab, r, rl);
    cat.len = 0;
    if (tok_buf_put(&cat, l, ll) || tok_buf_put(&cat, r, rl)) {
      rc = TS_ENOMEM;
      break;
    }
    int32_t ni = tok_strmap_get(&t->vocab, cat.p, cat.len);
    if (li < 0 || ri < 0 || ni < 0) {
      rc = ts_errorf(err, TS_EFORMAT, "model.merges[%zu]: a token is not in the vocabulary", i);
      break;
    }
    rc = tok_mergemap_put(&t->merges, li, ri, (int32_t)i, ni);
  }
  tok_buf_free(&cat);
  tok_strmap_free(&t->vocab); /* rebuilt by tok_finalize */
  return rc;
}

static int load_added(struct tokenizer *t, const json_t *added, ts_err *err) {
  size_t n = json_array_size(added);
  t->added = calloc(n + 1, sizeof *t->added);
  if (!t->added) return TS_ENOMEM;
  size_t i;
  json_t *a;
  json_array_foreach(added, i, a) {
    const json_t *c = json_object_get(a, "content");
    if (!json_is_string(c)) return ts_errorf(err, TS_EFORMAT, "added_tokens[%zu] has no content", i);
    tok_added *ad = &t->added[t->n_added];
    ad->id = (int32_t)json_integer_value(json_object_get(a, "id"));
    ad->special = jbool(a, "special", 0);
    ad->lstrip = jbool(a, "lstrip", 0);
    ad->rstrip = jbool(a, "rstrip", 0);
    ad->single_word = jbool(a, "single_word", 0);
    ad->normalized = jbool(a, "normalized", !ad->special);
    if (dup2(&ad->content, &ad->len, json_string_value(c), json_string_length(c))) return TS_ENOMEM;
    t->n_added++;
  }
  return 0;
}

int tok_load_hf_json(struct tokenizer **out, const char *buf, size_t len, const char *name,
                     ts_err *err) {
  json_error_t je;
  json_t *root = json_loadb(buf, len, JSON_ALLOW_NUL, &je);
  if (!root) return ts_errorf(err, TS_EFORMAT, "%s: invalid JSON at line %d: %s", name, je.line, je.text);
  struct tokenizer *t = calloc(1, sizeof *t);
  int rc = t ? 0 : ts_errorf(err, TS_ENOMEM, "out of memory");
  const json_t *added = json_object_get(root, "added_tokens");
  if (!rc && added && !json_is_array(added)) rc = ts_errorf(err, TS_EFORMAT, "added_tokens is not a list");
  if (!rc && !json_is_object(json_object_get(root, "model")))
    rc = ts_errorf(err, TS_EFORMAT, "no 'model' object");
  if (!rc) rc = load_model(t, json_object_get(root, "model"), added, err);
  if (!rc) rc = load_added(t, added, err);
  if (!rc) rc = load_normalizer(t, json_object_get(root, "normalizer"), err);
  if (!rc) rc = load_pretok(t, json_object_get(root, "pre_tokenizer"), err);
  if (!rc) rc = load_post(t, json_object_get(root, "post_processor"), err);
  if (!rc) rc = load_decoder(t, json_object_get(root, "decoder"), err);
  if (!rc) rc = tok_finalize(t, err);
  for (int i = 0; !rc && i < t->n_prefix + t->n_suffix; i++) {
    int32_t id = i < t->n_prefix ? t->prefix_ids[i] : t->suffix_ids[i - t->n_prefix];
    if (id < 0 || id >= t->n_ids) rc = ts_errorf(err, TS_EFORMAT, "post_processor id %d out of range", id);
  }
  json_decref(root);
  if (rc) {
    if (err && err->msg[0] && strncmp(err->msg, name, strlen(name))) ts_err_prefix(err, "%s", name);
    else if (err && !err->msg[0]) ts_errorf(err, rc, "%s: %s", name, ts_strerror(rc));
    tok_free(t);
    return rc;
  }
  t->bos_id = t->eos_id = -1;
  *out = t;
  return 0;
}

static int set_token(struct tokenizer *t, char **dst, int32_t *id, const json_t *v) {
  const char *s = json_is_string(v) ? json_string_value(v) : jstr(v, "content");
  if (!s) return 0;
  free(*dst);
  *dst = tok_strndup(s, strlen(s));
  if (!*dst) return TS_ENOMEM;
  *id = token_id(t, s, strlen(s));
  return 0;
}

static int add_eos(struct tokenizer *t, int32_t id) {
  if (id < 0 || id >= t->n_ids) return 0;
  for (int i = 0; i < t->n_eos_ids; i++)
    if (t->eos_ids[i] == id) return 0;
  int32_t *p = realloc(t->eos_ids, (size_t)(t->n_eos_ids + 1) * sizeof *p);
  if (!p) return TS_ENOMEM;
  t->eos_ids = p;
  p[t->n_eos_ids++] = id;
  return 0;
}

static int set_one(int32_t **v, int *n, int32_t id) {
  free(*v);
  *v = NULL;
  *n = 0;
  if (id < 0) return 0;
  *v = malloc(sizeof **v);
  if (!*v) return TS_ENOMEM;
  (*v)[0] = id;
  *n = 1;
  return 0;
}

static int load_configs(struct tokenizer *t, const char *dir, ts_err *err) {
  char path[4096];
  json_error_t je;
  snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
  FILE *f = fopen(path, "rb");
  int rc = 0;
  if (f) {
    fclose(f);
    json_t *c = json_load_file(path, 0, &je);
    if (!c) return ts_errorf(err, TS_EFORMAT, "%s: invalid JSON at line %d: %s", path, je.line, je.text);
    rc = set_token(t, &t->bos_token, &t->bos_id, json_object_get(c, "bos_token"));
    if (!rc) rc = set_token(t, &t->eos_token, &t->eos_id, json_object_get(c, "eos_token"));
    const json_t *ab = json_object_get(c, "add_bos_token"), *ae = json_object_get(c, "add_eos_token");
    if (!rc && json_is_boolean(ab)) rc = set_one(&t->prefix_ids, &t->n_prefix, json_is_true(ab) ? t->bos_id : -1);
    if (!rc && json_is_boolean(ae)) rc = set_one(&t->suffix_ids, &t->n_suffix, json_is_true(ae) ? t->eos_id : -1);
    const json_t *ct = json_object_get(c, "chat_template");
    const char *tmpl = json_string_value(ct);
    if (json_is_array(ct)) {
      size_t i;
      json_t *e;
      json_array_foreach(ct, i, e) {
        const char *nm = jstr(e, "name");
        if (nm && !strcmp(nm, "default")) tmpl = jstr(e, "template");
      }
    }
    if (!rc && tmpl && !(t->chat_template = tok_strndup(tmpl, strlen(tmpl)))) rc = TS_ENOMEM;
    json_decref(c);
    if (rc) return ts_errorf(err, rc, "%s: %s", path, ts_strerror(rc));
  }
  if (t->bos_id < 0 && t->n_prefix == 1) t->bos_id = t->prefix_ids[0];
  TS_TRY(add_eos(t, t->eos_id));
  snprintf(path, sizeof path, "%s/generation_config.json", dir);
  f = fopen(path, "rb");
  if (f) {
    fclose(f);
    json_t *g = json_load_file(path, 0, &je);
    if (!g) return ts_errorf(err, TS_EFORMAT, "%s: invalid JSON at line %d: %s", path, je.line, je.text);
    const json_t *e = json_object_get(g, "eos_token_id");
    if (json_is_integer(e)) rc = add_eos(t, (int32_t)json_integer_value(e));
    size_t i;
    json_t *x;
    json_array_foreach(e, i, x) if (!rc && json_is_integer(x)) rc = add_eos(t, (int32_t)json_integer_value(x));
    json_decref(g);
    if (rc) return ts_errorf(err, rc, "%s: %s", path, ts_strerror(rc));
  }
  if (t->eos_id < 0 && t->n_eos_ids > 0) t->eos_id = t->eos_ids[0];
  return 0;
}

int tok_load_hf(tokenizer **out, const char *dir, ts_err *err) {
  char path[4096];
  snprintf(path, sizeof path, "%s/tokenizer.json", dir);
  char *buf;
  size_t len;
  TS_TRY(read_file(path, &buf, &len, err));
  struct tokenizer *t;
  int rc = tok_load_hf_json(&t, buf, len, path, err);
  free(buf);
  if (rc) return rc;
  rc = load_configs(t, dir, err);
  if (rc) {
    tok_free(t);
    return rc;
  }
  *out = t;
  return 0;
}
