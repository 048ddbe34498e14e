/* The encode pipeline (added-token split, normalizers, pre-tokenizers, model, BOS/EOS) and the
 * decoders as one incremental state machine: tok_decode is tok_stream over all ids, so streamed
 * text always adds up to the full decode. Also the accessors, tok_free and tok_load_path. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>

#include "tokenizer/tok_internal.h"

/* ---------------------------------------------------------------- set-up */

int tok_alloc_ids(struct tokenizer *t, int32_t n_ids, int with_scores) {
  if (n_ids <= 0 || n_ids > (1 << 24)) return TS_ERANGE;
  t->n_ids = n_ids;
  t->pieces = calloc((size_t)n_ids, sizeof *t->pieces);
  t->piece_len = calloc((size_t)n_ids, sizeof *t->piece_len);
  t->mpieces = calloc((size_t)n_ids, sizeof *t->mpieces);
  t->mpiece_len = calloc((size_t)n_ids, sizeof *t->mpiece_len);
  t->special = calloc((size_t)n_ids, 1);
  if (with_scores) t->scores = calloc((size_t)n_ids, sizeof *t->scores);
  if (!t->pieces || !t->piece_len || !t->mpieces || !t->mpiece_len || !t->special ||
      (with_scores && !t->scores))
    return TS_ENOMEM;
  return 0;
}

int tok_set_mpiece(struct tokenizer *t, int32_t id, const char *s, size_t len) {
  if (id < 0 || id >= t->n_ids || len > UINT32_MAX) return TS_ERANGE;
  if (t->mpieces[id]) return TS_EFORMAT;
  t->mpieces[id] = tok_strndup(s, len);
  if (!t->mpieces[id]) return TS_ENOMEM;
  t->mpiece_len[id] = (uint32_t)len;
  return 0;
}

typedef struct {
  unsigned first;
  size_t len;
  int32_t idx;
} match_key;

/* By first byte, then longest first (leftmost-longest matching tries the longest first). */
static int match_key_cmp(const void *pa, const void *pb) {
  const match_key *a = pa, *b = pb;
  if (a->first != b->first) return a->first < b->first ? -1 : 1;
  if (a->len != b->len) return a->len > b->len ? -1 : 1;
  return a->idx < b->idx ? -1 : (a->idx > b->idx);
}

/* text/len are indexed by added-token index; idx lists the members, sorted for matching. */
static int matcher_build(const struct tokenizer *t, tok_matcher *m, int normalized) {
  m->text = calloc((size_t)t->n_added + 1, sizeof *m->text);
  m->len = calloc((size_t)t->n_added + 1, sizeof *m->len);
  m->idx = calloc((size_t)t->n_added + 1, sizeof *m->idx);
  if (!m->text || !m->len || !m->idx) return TS_ENOMEM;
  tok_buf nb = {0};
  for (int i = 0; i < t->n_added; i++) {
    const tok_added *a = &t->added[i];
    if (a->normalized != normalized || a->len == 0) continue;
    if (normalized) {
      int rc = tok_normalize(t, a->content, a->len, &nb);
      if (rc) {
        tok_buf_free(&nb);
        return rc;
      }
      if (nb.len == 0) continue;
      m->text[i] = tok_strndup(nb.p, nb.len);
      m->len[i] = nb.len;
    } else {
      m->text[i] = tok_strndup(a->content, a->len);
      m->len[i] = a->len;
    }
    if (!m->text[i]) {
      tok_buf_free(&nb);
      return TS_ENOMEM;
    }
    m->idx[m->n++] = i;
  }
  tok_buf_free(&nb);
  match_key *keys = malloc(((size_t)m->n + 1) * sizeof *keys);
  if (!keys) return TS_ENOMEM;
  for (int i = 0; i < m->n; i++)
    keys[i] = (match_key){(unsigned char)m->text[m->idx[i]][0], m->len[m->idx[i]], m->idx[i]};
  qsort(keys, (size_t)m->n, sizeof *keys, match_key_cmp);
  for (int i = 0; i < m->n; i++) m->idx[i] = keys[i].idx;
  free(keys);
  int k = 0;
  for (int c = 0; c < 257; c++) {
    while (k < m->n && (unsigned char)m->text[m->idx[k]][0] < c) k++;
    m->start[c] = k;
  }
  return 0;
}

static void matcher_free(tok_matcher *m, int n_added) {
  if (m->text)
    for (int i = 0; i < n_added; i++) free(m->text[i]);
  free(m->text);
  free(m->len);
  free(m->idx);
}

int tok_finalize(struct tokenizer *t, ts_err *err) {
  for (int32_t id = 0; id < t->n_ids; id++) {
    t->pieces[id] = t->mpieces[id];
    t->piece_len[id] = t->mpiece_len[id];
  }
  for (int i = 0; i < t->n_added; i++) {
    tok_added *a = &t->added[i];
    if (a->id < 0 || a->id >= t->n_ids)
      return ts_errorf(err, TS_EFORMAT, "added token id %d out of range", a->id);
    t->pieces[a->id] = a->content;
    t->piece_len[a->id] = (uint32_t)a->len;
    t->special[a->id] = (uint8_t)a->special;
  }
  if (tok_strmap_init(&t->vocab, (size_t)t->n_ids, t->mpieces, t->mpiece_len))
    return ts_errorf(err, TS_ENOMEM, "out of memory building the vocabulary");
  for (int32_t id = 0; id < t->n_ids; id++)
    if (t->mpieces[id]) tok_strmap_put(&t->vocab, id);
  for (int b = 0; b < 256; b++) {
    char name[8];
    static const char hex[] = "0123456789ABCDEF";
    memcpy(name, "<0x", 3);
    name[3] = hex[b >> 4];
    name[4] = hex[b & 15];
    name[5] = '>';
    t->byte_ids[b] = tok_strmap_get(&t->vocab, name, 6);
  }
  if (matcher_build(t, &t->match_raw, 0) || matcher_build(t, &t->match_norm, 1))
    return ts_errorf(err, TS_ENOMEM, "out of memory indexing added tokens");
  for (int i = 0; i < t->n_decs; i++)
    if (t->decs[i].kind == TOK_DEC_FUSE) t->dec_fuse = 1;
  t->dec_bytelevel = t->n_decs == 1 && t->decs[0].kind == TOK_DEC_BYTELEVEL;
  /* The stream supports per-token Replace, then ByteFallback, Fuse and Strip, in that order. */
  if (!t->dec_bytelevel) {
    int stage = 0;
    for (int i = 0; i < t->n_decs; i++) {
      int s = t->decs[i].kind == TOK_DEC_REPLACE ? 0 : t->decs[i].kind == TOK_DEC_BYTEFALLBACK ? 1
              : t->decs[i].kind == TOK_DEC_FUSE ? 2 : t->decs[i].kind == TOK_DEC_STRIP ? 3 : 9;
      if (s < stage || s == 9 || (s == 3 && t->decs[i].alen == 0))
        return ts_errorf(err, TS_EUNSUPPORTED, "unsupported decoder sequence");
      stage = s;
    }
  }
  return 0;
}

/* Onig's \s is Unicode White_Space; PCRE2's UCP \s also takes U+180E, so spell it out. */
#define WS_CLASS "\\x{9}-\\x{D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}" \
                 "\\x{202F}\\x{205F}\\x{3000}"

int tok_regex_compile(void **out, const char *pat, size_t len, ts_err *err) {
  tok_buf b = {0};
  int in_class = 0, rc = 0;
  for (size_t i = 0; i < len && !rc; i++) {
    char c = pat[i];
    if (c == '\\' && i + 1 < len) {
      char d = pat[i + 1];
      if (d == 's') rc = tok_buf_put(&b, in_class ? WS_CLASS : "[" WS_CLASS "]",
                                     strlen(in_class ? WS_CLASS : "[" WS_CLASS "]"));
      else if (d == 'S' && !in_class) rc = tok_buf_put(&b, "[^" WS_CLASS "]", strlen("[^" WS_CLASS "]"));
      else rc = tok_buf_put(&b, pat + i, 2);
      i++;
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = 1;
      rc = tok_buf_putc(&b, c);
      /* a ']' right after '[' or '[^' is a literal */
      if (i + 1 < len && pat[i + 1] == '^') rc = rc ? rc : tok_buf_putc(&b, pat[++i]);
      if (i + 1 < len && pat[i + 1] == ']') rc = rc ? rc : tok_buf_putc(&b, pat[++i]);
      continue;
    }
    if (c == ']' && in_class) in_class = 0;
    rc = tok_buf_putc(&b, c);
  }
  if (rc) {
    tok_buf_free(&b);
    return ts_errorf(err, TS_ENOMEM, "out of memory compiling a regex");
  }
  int ecode;
  PCRE2_SIZE eoff;
  pcre2_code *re = pcre2_compile((PCRE2_SPTR)(b.p ? b.p : ""), b.len, PCRE2_UTF | PCRE2_UCP,
                                 &ecode, &eoff, NULL);
  tok_buf_free(&b);
  if (!re) {
    char msg[256];
    pcre2_get_error_message(ecode, (PCRE2_UCHAR *)msg, sizeof msg);
    return ts_errorf(err, TS_EFORMAT, "bad pre-tokenizer regex at offset %zu: %s", (size_t)eoff,
                     msg);
  }
  pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* optional speed-up; the interpreter is the fallback */
  *out = re;
  return 0;
}

void tok_regex_free(void *re) { pcre2_code_free((pcre2_code *)re); }

void tok_free(tokenizer *t) {
  if (!t) return;
  for (int32_t id = 0; t->mpieces && id < t->n_ids; id++) free(t->mpieces[id]);
  free(t->mpieces);
  free(t->mpiece_len);
  free(t->pieces);
  free(t->piece_len);
  free(t->special);
  free(t->scores);
  tok_strmap_free(&t->vocab);
  tok_mergemap_free(&t->merges);
  for (int i = 0; i < t->n_norms; i++) {
    free(t->norms[i].a);
    free(t->norms[i].b);
  }
  for (int i = 0; i < t->n_pres; i++)
    if (t->pres[i].re) tok_regex_free(t->pres[i].re);
  if (t->re_bytelevel) tok_regex_free(t->re_bytelevel);
  for (int i = 0; i < t->n_decs; i++) {
    free(t->decs[i].a);
    free(t->decs[i].b);
  }
  matcher_free(&t->match_raw, t->n_added);
  matcher_free(&t->match_norm, t->n_added);
  for (int i = 0; i < t->n_added; i++) free(t->added[i].content);
  free(t->added);
  free(t->prefix_ids);
  free(t->suffix_ids);
  free(t->eos_ids);
  free(t->bos_token);
  free(t->eos_token);
  free(t->chat_template);
  free(t);
}

/* ---------------------------------------------------------------- normalizers */

static int replace_all(tok_buf *out, const char *s, size_t n, const char *pat, size_t plen,
                       const char *rep, size_t rlen) {
  out->len = 0;
  TS_TRY(tok_buf_reserve(out, n));
  if (out->p) out->p[0] = '\0';
  size_t i = 0;
  while (i < n) {
    if (plen && i + plen <= n && !memcmp(s + i, pat, plen)) {
      TS_TRY(tok_buf_put(out, rep, rlen));
      i += plen;
    } else {
      TS_TRY(tok_buf_putc(out, s[i]));
      i++;
    }
  }
  return 0;
}

/* Code points that Hugging Face's normalizer tables (an older Unicode) treat as plain starters
 * while utf8proc gives them a combining class or a composition: normalization never reorders or
 * composes across them there, so they are normalized as segments of their own here. Found by
 * comparing tokenizers' NFC with Python's unicodedata over every code point. U+11A7 is here
 * because utf8proc composes an LV syllable with it (dropping it), which is not NFC. */
static const uint32_t HF_STARTERS[][2] = {
    {0x7FD, 0x7FD}, {0x898, 0x89F}, {0x8CA, 0x8D3}, {0x9FE, 0x9FE}, {0xC3C, 0xC3C},
    {0xD3B, 0xD3C}, {0xEBA, 0xEBA}, {0x11A7, 0x11A7}, {0x1715, 0x1715}, {0x1ABF, 0x1ACE}, {0x1DF6, 0x1DFA},
    {0xA82C, 0xA82C}, {0x10D24, 0x10D27}, {0x10EAB, 0x10EAC}, {0x10F46, 0x10F50},
    {0x10F82, 0x10F85}, {0x11070, 0x11070}, {0x1133B, 0x1133B}, {0x1145E, 0x1145E},
    {0x11839, 0x1183A}, {0x11930, 0x11930}, {0x1193D, 0x1193E}, {0x11943, 0x11943},
    {0x119E0, 0x119E0}, {0x11A34, 0x11A34}, {0x11A47, 0x11A47}, {0x11A99, 0x11A99},
    {0x11D42, 0x11D42}, {0x11D44, 0x11D45}, {0x11D97, 0x11D97}, {0x16FF0, 0x16FF1},
    {0x1E130, 0x1E136}, {0x1E2AE, 0x1E2AE}, {0x1E2EC, 0x1E2EF}};

static int hf_starter(int32_t cp) {
  if (cp < 0x7FD) return 0;
  for (size_t i = 0; i < sizeof HF_STARTERS / sizeof HF_STARTERS[0]; i++)
    if ((uint32_t)cp >= HF_STARTERS[i][0] && (uint32_t)cp <= HF_STARTERS[i][1]) return 1;
  return 0;
}

static int unicode_normalize(tok_buf *dst, const char *s, size_t n, int opt) {
  if (n == 0) return 0;
  utf8proc_uint8_t *r = NULL;
  utf8proc_ssize_t len = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &r, opt);
  if (len < 0) return TS_EINVAL;
  int rc = tok_buf_put(dst, r, (size_t)len);
  free(r);
  return rc;
}

int tok_normalize(const struct tokenizer *t, const char *s, size_t n, tok_buf *out) {
  tok_buf tmp = {0};
  out->len = 0;
  TS_TRY(tok_buf_put(out, s, n));
  int rc = 0;
  for (int k = 0; k < t->n_norms && !rc; k++) {
    const tok_norm *nm = &t->norms[k];
    switch (nm->kind) {
      case TOK_NORM_NFC: case TOK_NORM_NFD: case TOK_NORM_NFKC: case TOK_NORM_NFKD: {
        if (out->len == 0) break;
        int opt = UTF8PROC_STABLE;
        if (nm->kind == TOK_NORM_NFC) opt |= UTF8PROC_COMPOSE;
        else if (nm->kind == TOK_NORM_NFD) opt |= UTF8PROC_DECOMPOSE;
        else if (nm->kind == TOK_NORM_NFKC) opt |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
        else opt |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
        tmp.len = 0;
        size_t seg = 0, i = 0;
        while (i < out->len && !rc) {
          int l;
          int32_t cp = tok_utf8_decode((const unsigned char *)out->p + i, out->len - i, &l);
          if (hf_starter(cp)) {
            rc = unicode_normalize(&tmp, out->p + seg, i - seg, opt);
            if (!rc) rc = tok_buf_put(&tmp, out->p + i, (size_t)l);
            seg = i + (size_t)l;
          }
          i += (size_t)l;
        }
        if (!rc) rc = unicode_normalize(&tmp, out->p + seg, out->len - seg, opt);
        out->len = 0;
        if (!rc) rc = tok_buf_put(out, tmp.p ? tmp.p : "", tmp.len);
        tmp.len = 0;
        break;
      }
      case TOK_NORM_PREPEND:
        if (out->len == 0) break;
        rc = tok_buf_put(&tmp, nm->a, nm->alen);
        if (!rc) rc = tok_buf_put(&tmp, out->p, out->len);
        if (!rc) {
          out->len = 0;
          rc = tok_buf_put(out, tmp.p, tmp.len);
        }
        tmp.len = 0;
        break;
      case TOK_NORM_REPLACE:
        rc = replace_all(&tmp, out->p, out->len, nm->a, nm->alen, nm->b, nm->blen);
        if (!rc) {
          out->len = 0;
          rc = tok_buf_put(out, tmp.p ? tmp.p : "", tmp.len);
        }
        tmp.len = 0;
        break;
    }
  }
  tok_buf_free(&tmp);
  return rc;
}

/* ---------------------------------------------------------------- encode */

typedef struct {
  int32_t *ids;
  size_t n, cap;
} idvec;

typedef struct {
  size_t off, len;
} range;

typedef struct {
  range *r;
  size_t n, cap;
} ranges;

static int ranges_push(ranges *v, size_t off, size_t len) {
  if (len == 0) return 0;
  if (v->n == v->cap) {
    size_t cap = v->cap ? v->cap * 2 : 16;
    range *r = realloc(v->r, cap * sizeof *r);
    if (!r) return TS_ENOMEM;
    v->r = r;
    v->cap = cap;
  }
  v->r[v->n].off = off;
  v->r[v->n].len = len;
  v->n++;
  return 0;
}

/* Regex matches over s[0..n) as (range, is_match) pieces, then grouped by behavior. */
static int split_regex(const pcre2_code *re, pcre2_match_data *md, const char *s, size_t n,
                       tok_split_behavior beh, int invert, size_t base, ranges *out) {
  size_t pos = 0, prev = 0;
  /* pieces: alternating gaps and matches */
  ranges all = {0};
  uint8_t *is_m = NULL;
  size_t ism_cap = 0;
  int rc = 0;
#define ADD_PIECE(o, l, m)                                                    \
  do {                                                                        \
    if ((l) == 0) break;                                                      \
    if (all.n == ism_cap) {                                                   \
      ism_cap = ism_cap ? ism_cap * 2 : 16;                                   \
      uint8_t *p_ = realloc(is_m, ism_cap);                                   \
      if (!p_) { rc = TS_ENOMEM; goto done; }                                 \
      is_m = p_;                                                              \
    }                                                                         \
    is_m[all.n] = (uint8_t)((m) != invert);                                   \
    if ((rc = ranges_push(&all, (o), (l)))) goto done;                        \
  } while (0)
  while (pos <= n) {
    int r = pcre2_match(re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, md, NULL);
    if (r < 0) break;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    size_t ms = ov[0], me = ov[1];
    if (me == ms) { /* empty match: step one character */
      if (ms >= n) break;
      int l;
      tok_utf8_decode((const unsigned char *)s + ms, n - ms, &l);
      pos = ms + (size_t)l;
      continue;
    }
    ADD_PIECE(prev, ms - prev, 0);
    ADD_PIECE(ms, me - ms, 1);
    prev = pos = me;
  }
  ADD_PIECE(prev, n - prev, 0);
#undef ADD_PIECE
  /* group */
  {
    ranges g = {0};
    int prev_match = 0;
    if (beh == TOK_SPLIT_MERGED_NEXT) {
      /* walk backwards, then reverse */
      for (size_t k = all.n; k-- > 0;) {
        if (is_m[k] && !prev_match && g.n) {
          g.r[g.n - 1].len += g.r[g.n - 1].off - all.r[k].off;
          g.r[g.n - 1].off = all.r[k].off;
        } else if ((rc = ranges_push(&g, all.r[k].off, all.r[k].len))) {
          free(g.r);
          goto done;
        }
        prev_match = is_m[k];
      }
      for (size_t a = 0, b = g.n ? g.n - 1 : 0; a < b; a++, b--) {
        range tmp = g.r[a];
        g.r[a] = g.r[b];
        g.r[b] = tmp;
      }
    } else {
      for (size_t k = 0; k < all.n; k++) {
        int m = is_m[k];
        if (beh == TOK_SPLIT_REMOVED && m) continue;
        int merge = (beh == TOK_SPLIT_MERGED_PREV && m && !prev_match && g.n) ||
                    (beh == TOK_SPLIT_CONTIGUOUS && g.n && m == prev_match);
        if (merge) g.r[g.n - 1].len = all.r[k].off + all.r[k].len - g.r[g.n - 1].off;
        else if ((rc = ranges_push(&g, all.r[k].off, all.r[k].len))) {
          free(g.r);
          goto done;
        }
        prev_match = m;
      }
    }
    for (size_t k = 0; k < g.n && !rc; k++) rc = ranges_push(out, base + g.r[k].off, g.r[k].len);
    free(g.r);
  }
done:
  free(all.r);
  free(is_m);
  return rc;
}

typedef struct {
  tok_buf a, b;      /* text buffers (double-buffered across ByteLevel steps) */
  ranges pa, pb;
  pcre2_match_data *md;
} pre_ctx;

/* Pre-tokenizes s[0..n) and runs the model on every word. */
static int encode_piece(const struct tokenizer *t, pre_ctx *c, const char *s, size_t n,
                        idvec *out) {
  tok_buf *cur = &c->a, *nxt = &c->b;
  ranges *pc = &c->pa, *pn = &c->pb;
  cur->len = 0;
  pc->n = 0;
  TS_TRY(tok_buf_put(cur, s, n));
  TS_TRY(ranges_push(pc, 0, n));
  for (int k = 0; k < t->n_pres; k++) {
    const tok_pre *p = &t->pres[k];
    pn->n = 0;
    if (p->kind == TOK_PRE_SPLIT) {
      for (size_t i = 0; i < pc->n; i++)
        TS_TRY(split_regex(p->re, c->md, cur->p + pc->r[i].off, pc->r[i].len, p->behavior,
                           p->invert, pc->r[i].off, pn));
      ranges tr = *pc;
      *pc = *pn;
      *pn = tr;
      continue;
    }
    /* ByteLevel: optional prefix space, optional GPT-2 split, then bytes -> alphabet */
    nxt->len = 0;
    for (size_t i = 0; i < pc->n; i++) {
      const char *w = cur->p + pc->r[i].off;
      size_t wl = pc->r[i].len;
      tok_buf tmp = {0};
      if (p->add_prefix_space && w[0] != ' ') {
        if (tok_buf_putc(&tmp, ' ') || tok_buf_put(&tmp, w, wl)) {
          tok_buf_free(&tmp);
          return TS_ENOMEM;
        }
        w = tmp.p;
        wl = tmp.len;
      }
      ranges sub = {0};
      int rc = p->use_regex ? split_regex(t->re_bytelevel, c->md, w, wl, TOK_SPLIT_ISOLATED, 0, 0, &sub)
                            : ranges_push(&sub, 0, wl);
      for (size_t j = 0; j < sub.n && !rc; j++) {
        size_t start = nxt->len;
        for (size_t q = 0; q < sub.r[j].len && !rc; q++) {
          char u[4];
          int ul = tok_utf8_encode(tok_bytelevel_cp((uint8_t)w[sub.r[j].off + q]), u);
          rc = tok_buf_put(nxt, u, (size_t)ul);
        }
        if (!rc) rc = ranges_push(pn, start, nxt->len - start);
      }
      free(sub.r);
      tok_buf_free(&tmp);
      TS_TRY(rc);
    }
    tok_buf *tb = cur;
    cur = nxt;
    nxt = tb;
    ranges tr = *pc;
    *pc = *pn;
    *pn = tr;
  }
  for (size_t i = 0; i < pc->n; i++)
    TS_TRY(tok_model_encode(t, cur->p + pc->r[i].off, pc->r[i].len, &out->ids, &out->n, &out->cap));
  return 0;
}

/* Splits s on added tokens (HF AddedVocabulary::find_matches) and calls back per segment. */
typedef int (*segment_fn)(const struct tokenizer *t, void *ctx, const char *s, size_t n,
                          int32_t id);

static int split_added(const struct tokenizer *t, const tok_matcher *m, int parse_special,
                       const char *s, size_t n, segment_fn fn, void *ctx) {
  size_t start_offset = 0, i = 0;
  while (m->n && i < n) {
    unsigned c = (unsigned char)s[i];
    int found = -1;
    for (int k = m->start[c]; k < m->start[c + 1]; k++) {
      int a = m->idx[k];
      if (m->len[a] <= n - i && !memcmp(s + i, m->text[a], m->len[a])) {
        found = a;
        break; /* longest first */
      }
    }
    if (found < 0) {
      i++;
      continue;
    }
    const tok_added *tk = &t->added[found];
    size_t start = i, stop = i + m->len[found];
    i = stop;
    if (tk->special && !parse_special) continue;
    if (tk->single_word) {
      int l;
      int start_space = 1, stop_space = 1;
      if (start > 0) { /* previous char */
        size_t p = start - 1;
        while (p > 0 && ((unsigned char)s[p] & 0xC0) == 0x80) p--;
        start_space = !tok_is_alnum(tok_utf8_decode((const unsigned char *)s + p, start - p, &l));
      }
      if (stop < n) stop_space = !tok_is_alnum(tok_utf8_decode((const unsigned char *)s + stop, n - stop, &l));
      if (!start_space || !stop_space) continue;
    }
    if (tk->lstrip) {
      size_t ns = start;
      while (ns > 0) {
        size_t p = ns - 1;
        while (p > 0 && ((unsigned char)s[p] & 0xC0) == 0x80) p--;
        int l;
        if (!tok_is_whitespace(tok_utf8_decode((const unsigned char *)s + p, ns - p, &l))) break;
        ns = p;
      }
      start = ns > start_offset ? ns : start_offset;
    }
    if (tk->rstrip) {
      while (stop < n) {
        int l;
        if (!tok_is_whitespace(tok_utf8_decode((const unsigned char *)s + stop, n - stop, &l))) break;
        stop += (size_t)l;
      }
      /* the scan resumes at the match end, not after the stripped spaces (as HF's does) */
    }
    if (start_offset < start) TS_TRY(fn(t, ctx, s + start_offset, start - start_offset, -1));
    TS_TRY(fn(t, ctx, NULL, 0, tk->id));
    start_offset = stop;
  }
  if (start_offset < n) TS_TRY(fn(t, ctx, s + start_offset, n - start_offset, -1));
  return 0;
}

typedef struct {
  idvec *out;
  pre_ctx *pre;
  tok_buf norm;
  int parse_special;
} enc_ctx;

static int seg_normalized(const struct tokenizer *t, void *vctx, const char *s, size_t n,
                          int32_t id) {
  enc_ctx *c = vctx;
  if (id >= 0) return tok_push_id(&c->out->ids, &c->out->n, &c->out->cap, id);
  return encode_piece(t, c->pre, s, n, c->out);
}

static int seg_raw(const struct tokenizer *t, void *vctx, const char *s, size_t n, int32_t id) {
  enc_ctx *c = vctx;
  if (id >= 0) return tok_push_id(&c->out->ids, &c->out->n, &c->out->cap, id);
  TS_TRY(tok_normalize(t, s, n, &c->norm));
  /* the normalized buffer is reused by nested calls only after this segment is done */
  tok_buf nb = c->norm;
  c->norm = (tok_buf){0};
  int rc = split_added(t, &t->match_norm, c->parse_special, nb.p ? nb.p : "", nb.len,
                       seg_normalized, c);
  tok_buf_free(&c->norm);
  c->norm = nb;
  return rc;
}

int tok_encode(const tokenizer *t, const char *text, size_t len, int flags, int32_t **ids,
               size_t *n_ids, ts_err *err) {
  *ids = NULL;
  *n_ids = 0;
  tok_buf clean = {0};
  idvec out = {0};
  pre_ctx pre = {0};
  enc_ctx ec = {.out = &out, .pre = &pre, .parse_special = !!(flags & TOK_PARSE_SPECIAL)};
  int rc = 0;
  if (!tok_utf8_valid(text, len)) {
    rc = tok_utf8_lossy(&clean, text, len);
    text = clean.p;
    len = clean.len;
  }
  pre.md = pcre2_match_data_create(4, NULL);
  if (!pre.md) rc = TS_ENOMEM;
  if (!rc && (flags & TOK_ADD_SPECIAL))
    for (int i = 0; i < t->n_prefix && !rc; i++) rc = tok_push_id(&out.ids, &out.n, &out.cap, t->prefix_ids[i]);
  if (!rc) rc = split_added(t, &t->match_raw, ec.parse_special, text ? text : "", len, seg_raw, &ec);
  if (!rc && (flags & TOK_ADD_SPECIAL))
    for (int i = 0; i < t->n_suffix && !rc; i++) rc = tok_push_id(&out.ids, &out.n, &out.cap, t->suffix_ids[i]);
  pcre2_match_data_free(pre.md);
  tok_buf_free(&pre.a);
  tok_buf_free(&pre.b);
  free(pre.pa.r);
  free(pre.pb.r);
  tok_buf_free(&ec.norm);
  tok_buf_free(&clean);
  if (rc) {
    free(out.ids);
    return ts_errorf(err, rc, "tokenizer: encoding failed: %s", ts_strerror(rc));
  }
  if (!out.ids) out.ids = malloc(sizeof(int32_t));
  if (!out.ids) return ts_errorf(err, TS_ENOMEM, "tokenizer: out of memory");
  *ids = out.ids;
  *n_ids = out.n;
  return 0;
}

/* ---------------------------------------------------------------- decode (incremental) */

struct tok_stream {
  const struct tokenizer *t;
  int skip_special;
  tok_buf out;    /* text returned by the current call */
  tok_buf pend;   /* ByteLevel: undecided UTF-8 tail; otherwise the open <0xNN> group */
  tok_buf held;   /* Strip(stop): trailing content characters not yet known to be final */
  tok_buf tokb;   /* scratch for one token's text */
  tok_buf tokc;
  int stripped;   /* leading content characters dropped so far (whole-text Strip) */
  int started;    /* a character passed the leading Strip */
  size_t n_tokens;
};

static const tok_dec *find_strip(const struct tokenizer *t) {
  for (int i = 0; i < t->n_decs; i++)
    if (t->decs[i].kind == TOK_DEC_STRIP) return &t->decs[i];
  return NULL;
}

/* Strip of one token's text (when no Fuse merged the tokens first). */
static void strip_piece(const tok_dec *d, const char **s, size_t *n) {
  for (int k = 0; k < d->start && *n >= d->alen && !memcmp(*s, d->a, d->alen); k++) {
    *s += d->alen;
    *n -= d->alen;
  }
  for (int k = 0; k < d->stop && *n >= d->alen && !memcmp(*s + *n - d->alen, d->a, d->alen); k++)
    *n -= d->alen;
}

/* Appends fused text to the output through a whole-text Strip. */
static int sink(tok_stream *st, const char *s, size_t n) {
  const tok_dec *d = st->t->dec_fuse ? find_strip(st->t) : NULL;
  if (!d) return tok_buf_put(&st->out, s, n);
  size_t i = 0;
  while (i < n) {
    int l;
    tok_utf8_decode((const unsigned char *)s + i, n - i, &l);
    int is_c = (size_t)l == d->alen && !memcmp(s + i, d->a, d->alen);
    if (!st->started && is_c && st->stripped < d->start) {
      st->stripped++;
    } else if (is_c && d->stop > 0) {
      st->started = 1;
      TS_TRY(tok_buf_put(&st->held, s + i, (size_t)l));
    } else {
      st->started = 1;
      if (st->held.len) TS_TRY(tok_buf_put(&st->out, st->held.p, st->held.len));
      st->held.len = 0;
      TS_TRY(tok_buf_put(&st->out, s + i, (size_t)l));
    }
    i += (size_t)l;
  }
  return 0;
}

static int emit_piece(tok_stream *st, const char *s, size_t n) {
  const tok_dec *d = st->t->dec_fuse ? NULL : find_strip(st->t);
  if (d) strip_piece(d, &s, &n);
  return sink(st, s, n);
}

static int flush_group(tok_stream *st) {
  if (!st->pend.len) return 0;
  int rc = 0;
  if (tok_utf8_valid(st->pend.p, st->pend.len)) rc = emit_piece(st, st->pend.p, st->pend.len);
  else
    for (size_t i = 0; i < st->pend.len && !rc; i++) rc = emit_piece(st, "\xEF\xBF\xBD", 3);
  st->pend.len = 0;
  return rc;
}

/* <0xNN> as Rust's u8::from_str_radix reads the two characters (a leading '+' included). */
static int byte_token(const char *s, size_t n) {
  if (n != 6 || memcmp(s, "<0x", 3) || s[5] != '>') return -1;
  int v = 0, digits = 0;
  for (int i = 3; i < 5; i++) {
    char c = s[i];
    int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
            : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
    if (i == 3 && c == '+') continue;
    if (d < 0) return -1;
    v = v * 16 + d;
    digits++;
  }
  return digits ? v : -1;
}

/* Emits the decided prefix of the ByteLevel byte stream (at_end: everything, lossily). */
static int bl_drain(tok_stream *st, int at_end) {
  const unsigned char *p = (const unsigned char *)st->pend.p;
  size_t n = st->pend.len, i = 0;
  while (i < n) {
    int partial, k = tok_utf8_seq(p + i, n - i, &partial);
    if (k > 0) {
      TS_TRY(tok_buf_put(&st->out, p + i, (size_t)k));
      i += (size_t)k;
      continue;
    }
    if (partial && !at_end) break;
    TS_TRY(tok_buf_put(&st->out, "\xEF\xBF\xBD", 3));
    if (partial) {
      i = n;
      break;
    }
    i += k < 0 ? (size_t)(-k) : 1;
  }
  if (i < n) memmove(st->pend.p, st->pend.p + i, n - i);
  st->pend.len = n - i;
  return 0;
}

static int stream_token(tok_stream *st, int32_t id) {
  const struct tokenizer *t = st->t;
  if (id < 0 || id >= t->n_ids || !t->pieces[id]) return 0; /* HF drops unknown ids */
  if (st->skip_special && t->special[id]) return 0;
  const char *s = t->pieces[id];
  size_t n = t->piece_len[id];
  if (!t->has_decoder) { /* tokens joined by spaces */
    if (st->n_tokens++) TS_TRY(tok_buf_putc(&st->out, ' '));
    return tok_buf_put(&st->out, s, n);
  }
  if (t->dec_bytelevel) {
    /* every character maps back to a byte, or the token's own UTF-8 is used */
    size_t mark = st->pend.len;
    int ok = 1;
    for (size_t i = 0; i < n && ok;) {
      int l;
      int b = tok_bytelevel_byte(tok_utf8_decode((const unsigned char *)s + i, n - i, &l));
      if (b < 0) ok = 0;
      else TS_TRY(tok_buf_putc(&st->pend, (char)b));
      i += (size_t)l;
    }
    if (!ok) {
      st->pend.len = mark;
      TS_TRY(tok_buf_put(&st->pend, s, n));
    }
    return bl_drain(st, 0);
  }
  int has_bf = 0;
  st->tokb.len = 0;
  TS_TRY(tok_buf_put(&st->tokb, s, n));
  for (int k = 0; k < t->n_decs; k++) {
    const tok_dec *d = &t->decs[k];
    if (d->kind == TOK_DEC_REPLACE) {
      TS_TRY(replace_all(&st->tokc, st->tokb.p, st->tokb.len, d->a, d->alen, d->b, d->blen));
      st->tokb.len = 0;
      TS_TRY(tok_buf_put(&st->tokb, st->tokc.p ? st->tokc.p : "", st->tokc.len));
    } else if (d->kind == TOK_DEC_BYTEFALLBACK) {
      has_bf = 1;
    }
  }
  if (has_bf) {
    int b = byte_token(st->tokb.p, st->tokb.len);
    if (b >= 0) return tok_buf_putc(&st->pend, (char)b);
    TS_TRY(flush_group(st));
  }
  return emit_piece(st, st->tokb.p, st->tokb.len);
}

int tok_stream_create(tok_stream **out, const tokenizer *t, int skip_special) {
  tok_stream *s = calloc(1, sizeof *s);
  if (!s) return TS_ENOMEM;
  s->t = t;
  s->skip_special = skip_special;
  if (tok_buf_reserve(&s->out, 64)) {
    free(s);
    return TS_ENOMEM;
  }
  *out = s;
  return 0;
}

int tok_stream_push(tok_stream *s, int32_t id, const char **text, size_t *len) {
  s->out.len = 0;
  s->out.p[0] = '\0';
  int rc = stream_token(s, id);
  *text = s->out.p;
  *len = s->out.len;
  return rc;
}

int tok_stream_flush(tok_stream *s, const char **text, size_t *len) {
  s->out.len = 0;
  s->out.p[0] = '\0';
  int rc = 0;
  if (s->t->dec_bytelevel) rc = bl_drain(s, 1);
  else rc = flush_group(s);
  s->held.len = 0; /* trailing Strip(stop) characters are dropped at the end */
  *text = s->out.p;
  *len = s->out.len;
  return rc;
}

void tok_stream_free(tok_stream *s) {
  if (!s) return;
  tok_buf_free(&s->out);
  tok_buf_free(&s->pend);
  tok_buf_free(&s->held);
  tok_buf_free(&s->tokb);
  tok_buf_free(&s->tokc);
  free(s);
}

int tok_decode(const tokenizer *t, const int32_t *ids, size_t n_ids, int skip_special, char **text,
               size_t *len, ts_err *err) {
  tok_stream *s;
  tok_buf all = {0};
  if (tok_stream_create(&s, t, skip_special)) return ts_errorf(err, TS_ENOMEM, "tokenizer: out of memory");
  int rc = 0;
  const char *p;
  size_t n;
  for (size_t i = 0; i < n_ids && !rc; i++) {
    rc = tok_stream_push(s, ids[i], &p, &n);
    if (!rc) rc = tok_buf_put(&all, p, n);
  }
  if (!rc) rc = tok_stream_flush(s, &p, &n);
  if (!rc) rc = tok_buf_put(&all, p, n);
  tok_stream_free(s);
  if (rc) {
    tok_buf_free(&all);
    return ts_errorf(err, rc, "tokenizer: decoding failed: %s", ts_strerror(rc));
  }
  if (!all.p && tok_buf_reserve(&all, 1)) return ts_errorf(err, TS_ENOMEM, "tokenizer: out of memory");
  all.p[all.len] = '\0';
  *text = all.p;
  if (len) *len = all.len;
  return 0;
}

/* ---------------------------------------------------------------- accessors */

int tok_vocab_size(const tokenizer *t) { return t->n_ids; }
int tok_bos_id(const tokenizer *t) { return t->bos_id; }
int tok_eos_id(const tokenizer *t) { return t->eos_id; }
int tok_eos_ids(const tokenizer *t, const int32_t **ids) {
  *ids = t->eos_ids;
  return t->n_eos_ids;
}
int tok_is_special(const tokenizer *t, int32_t id) {
  return id >= 0 && id < t->n_ids && t->special[id];
}
const char *tok_chat_template(const tokenizer *t) { return t->chat_template; }
const char *tok_piece(const tokenizer *t, int32_t id) {
  return id >= 0 && id < t->n_ids ? t->pieces[id] : NULL;
}
const char *tok_bos_token(const tokenizer *t) { return t->bos_token; }
const char *tok_eos_token(const tokenizer *t) { return t->eos_token; }

int tok_load_gguf_path(tokenizer **out, const char *path, ts_err *err);

int tok_load_path(tokenizer **out, const char *path, ts_err *err) {
  struct stat st;
  if (stat(path, &st) != 0) return ts_errorf(err, TS_ENOTFOUND, "%s: no such file or directory", path);
  if (S_ISDIR(st.st_mode)) return tok_load_hf(out, path, err);
  return tok_load_gguf_path(out, path, err);
}
