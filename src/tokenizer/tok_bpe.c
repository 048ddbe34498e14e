/* The subword models on one pre-tokenized word: BPE by merge ranks (Hugging Face semantics,
 * byte fallback and unk fusing included) and SentencePiece BPE by piece scores (llama.cpp's SPM
 * tokenizer for GGUF "llama" vocabularies). Both keep the symbols as a linked list and the
 * candidate merges in a binary heap: O(n log n) per word. */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"

typedef struct {
  int32_t id; /* BPE: token id; SPM: unused until the end */
  int prev, next;
  uint32_t start, len; /* bytes of the word covered; len 0 = merged away */
} sym;

typedef struct {
  double key; /* BPE: merge rank; SPM: -score (lower pops first) */
  int pos, right;
  int32_t new_id;
  uint32_t len; /* SPM: expected byte length of the merged pair */
} cand;

typedef struct {
  cand *v;
  size_t n, cap;
} heap;

static int cand_less(const cand *a, const cand *b) {
  return a->key < b->key || (a->key == b->key && a->pos < b->pos);
}

static int heap_push(heap *h, cand c) {
  if (h->n == h->cap) {
    size_t cap = h->cap ? h->cap * 2 : 32;
    cand *v = realloc(h->v, cap * sizeof *v);
    if (!v) return TS_ENOMEM;
    h->v = v;
    h->cap = cap;
  }
  size_t i = h->n++;
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (!cand_less(&c, &h->v[p])) break;
    h->v[i] = h->v[p];
    i = p;
  }
  h->v[i] = c;
  return 0;
}

static cand heap_pop(heap *h) {
  cand top = h->v[0];
  cand last = h->v[--h->n];
  size_t i = 0;
  for (;;) {
    size_t l = 2 * i + 1, r = l + 1, m = i;
    const cand *best = &last;
    if (l < h->n && cand_less(&h->v[l], best)) m = l, best = &h->v[l];
    if (r < h->n && cand_less(&h->v[r], best)) m = r;
    if (m == i) break;
    h->v[i] = h->v[m];
    i = m;
  }
  if (h->n) h->v[i] = last;
  return top;
}

typedef struct {
  sym *s;
  int n, cap;
} symlist;

static int sym_add(symlist *l, int32_t id, uint32_t start, uint32_t len) {
  if (l->n == l->cap) {
    int cap = l->cap ? l->cap * 2 : 32;
    sym *s = realloc(l->s, (size_t)cap * sizeof *s);
    if (!s) return TS_ENOMEM;
    l->s = s;
    l->cap = cap;
  }
  sym *y = &l->s[l->n];
  y->id = id;
  y->start = start;
  y->len = len;
  y->prev = l->n - 1;
  y->next = -1;
  if (l->n > 0) l->s[l->n - 1].next = l->n;
  l->n++;
  return 0;
}

static int bpe_try_pair(const struct tokenizer *t, heap *h, const symlist *l, int a) {
  if (a < 0) return 0;
  int b = l->s[a].next;
  if (b < 0) return 0;
  const tok_merge *m = tok_mergemap_get(&t->merges, l->s[a].id, l->s[b].id);
  if (!m) return 0;
  cand c = {.key = m->rank, .pos = a, .right = b, .new_id = m->new_id};
  return heap_push(h, c);
}

static int bpe_word(const struct tokenizer *t, const char *w, size_t n, symlist *l, heap *h) {
  int32_t unk = -1;
  uint32_t unk_start = 0, unk_len = 0;
  size_t i = 0;
  while (i < n) {
    int partial, clen = tok_utf8_seq((const unsigned char *)w + i, n - i, &partial);
    if (clen <= 0) clen = 1; /* the pipeline passes valid UTF-8; stay safe anyway */
    int32_t id = tok_strmap_get(&t->vocab, w + i, (size_t)clen);
    if (id >= 0) {
      if (unk >= 0) {
        TS_TRY(sym_add(l, unk, unk_start, unk_len));
        unk = -1;
      }
      TS_TRY(sym_add(l, id, (uint32_t)i, (uint32_t)clen));
      i += (size_t)clen;
      continue;
    }
    if (t->byte_fallback) {
      int ok = 1;
      for (int k = 0; k < clen; k++)
        if (t->byte_ids[(unsigned char)w[i + k]] < 0) ok = 0;
      if (ok) {
        for (int k = 0; k < clen; k++)
          TS_TRY(sym_add(l, t->byte_ids[(unsigned char)w[i + k]], (uint32_t)(i + k), 1));
        i += (size_t)clen;
        continue;
      }
    }
    if (t->unk_id >= 0) {
      if (unk >= 0 && t->fuse_unk) {
        unk_len += (uint32_t)clen;
      } else {
        if (unk >= 0) TS_TRY(sym_add(l, unk, unk_start, unk_len));
        unk = t->unk_id;
        unk_start = (uint32_t)i;
        unk_len = (uint32_t)clen;
      }
    }
    i += (size_t)clen;
  }
  if (unk >= 0) TS_TRY(sym_add(l, unk, unk_start, unk_len));

  for (int a = 0; a + 1 < l->n; a++) TS_TRY(bpe_try_pair(t, h, l, a));
  while (h->n) {
    cand c = heap_pop(h);
    sym *A = &l->s[c.pos];
    if (A->len == 0 || A->next < 0) continue;
    sym *B = &l->s[A->next];
    const tok_merge *m = tok_mergemap_get(&t->merges, A->id, B->id);
    if (!m || m->new_id != c.new_id) continue;
    A->id = c.new_id;
    A->len += B->len;
    B->len = 0;
    A->next = B->next;
    if (B->next >= 0) l->s[B->next].prev = c.pos;
    TS_TRY(bpe_try_pair(t, h, l, A->prev));
    TS_TRY(bpe_try_pair(t, h, l, c.pos));
  }
  return 0;
}

static int spm_try_pair(const struct tokenizer *t, heap *h, const symlist *l, const char *w, int a) {
  if (a < 0) return 0;
  int b = l->s[a].next;
  if (b < 0) return 0;
  uint32_t len = l->s[a].len + l->s[b].len;
  int32_t id = tok_strmap_get(&t->vocab, w + l->s[a].start, len);
  if (id < 0) return 0;
  cand c = {.key = -(double)t->scores[id], .pos = a, .right = b, .new_id = id, .len = len};
  return heap_push(h, c);
}

static int spm_word(const struct tokenizer *t, const char *w, size_t n, symlist *l, heap *h) {
  size_t i = 0;
  while (i < n) {
    int partial, clen = tok_utf8_seq((const unsigned char *)w + i, n - i, &partial);
    if (clen <= 0) clen = 1;
    TS_TRY(sym_add(l, -1, (uint32_t)i, (uint32_t)clen));
    i += (size_t)clen;
  }
  for (int a = 0; a + 1 < l->n; a++) TS_TRY(spm_try_pair(t, h, l, w, a));
  while (h->n) {
    cand c = heap_pop(h);
    sym *A = &l->s[c.pos], *B = &l->s[c.right];
    if (A->len == 0 || B->len == 0 || A->len + B->len != c.len) continue;
    A->len += B->len;
    B->len = 0;
    A->next = B->next;
    if (B->next >= 0) l->s[B->next].prev = c.pos;
    TS_TRY(spm_try_pair(t, h, l, w, A->prev));
    TS_TRY(spm_try_pair(t, h, l, w, c.pos));
  }
  return 0;
}

int tok_model_encode(const struct tokenizer *t, const char *w, size_t n, int32_t **ids,
                     size_t *n_ids, size_t *cap) {
  if (n == 0) return 0;
  if (t->model == TOK_MODEL_BPE && t->ignore_merges) {
    int32_t id = tok_strmap_get(&t->vocab, w, n);
    if (id >= 0) return tok_push_id(ids, n_ids, cap, id);
  }
  symlist l = {0};
  heap h = {0};
  int rc = t->model == TOK_MODEL_BPE ? bpe_word(t, w, n, &l, &h) : spm_word(t, w, n, &l, &h);
  for (int i = 0; rc == 0 && l.n > 0 && i >= 0; i = l.s[i].next) {
    const sym *y = &l.s[i];
    if (t->model == TOK_MODEL_BPE) {
      rc = tok_push_id(ids, n_ids, cap, y->id);
      continue;
    }
    int32_t id = tok_strmap_get(&t->vocab, w + y->start, y->len);
    if (id >= 0) {
      rc = tok_push_id(ids, n_ids, cap, id);
      continue;
    }
    for (uint32_t k = 0; rc == 0 && k < y->len; k++) {
      int32_t b = t->byte_ids[(unsigned char)w[y->start + k]];
      if (b < 0) b = t->unk_id;
      if (b >= 0) rc = tok_push_id(ids, n_ids, cap, b);
    }
  }
  free(l.s);
  free(h.v);
  return rc;
}
