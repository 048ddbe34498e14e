/* Tokenizer helpers: growable buffers, the vocabulary and merge hash maps, UTF-8 validation with
 * U+FFFD replacement, the GPT-2 byte-level alphabet and Unicode character classes. */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "tokenizer/tok_internal.h"

int tok_buf_reserve(tok_buf *b, size_t extra) {
  if (b->len + extra + 1 <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 64;
  while (cap < b->len + extra + 1) cap *= 2;
  char *p = realloc(b->p, cap);
  if (!p) return TS_ENOMEM;
  b->p = p;
  b->cap = cap;
  return 0;
}

int tok_buf_put(tok_buf *b, const void *s, size_t n) {
  TS_TRY(tok_buf_reserve(b, n));
  if (n) memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
  return 0;
}

int tok_buf_putc(tok_buf *b, char c) { return tok_buf_put(b, &c, 1); }

void tok_buf_free(tok_buf *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

char *tok_strndup(const char *s, size_t n) {
  char *p = malloc(n + 1);
  if (!p) return NULL;
  if (n) memcpy(p, s, n);
  p[n] = '\0';
  return p;
}

int tok_push_id(int32_t **ids, size_t *n, size_t *cap, int32_t id) {
  if (*n == *cap) {
    size_t c = *cap ? *cap * 2 : 16;
    int32_t *p = realloc(*ids, c * sizeof *p);
    if (!p) return TS_ENOMEM;
    *ids = p;
    *cap = c;
  }
  (*ids)[(*n)++] = id;
  return 0;
}

/* FNV-1a: short keys, good enough spread for a power-of-two table. */
static uint32_t hash_bytes(const char *s, size_t n) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
  return h;
}

int tok_strmap_init(tok_strmap *m, size_t n_expected, char **keys, uint32_t *key_len) {
  uint32_t cap = 16;
  while (cap < n_expected * 2 + 16) cap *= 2;
  m->slots = malloc(cap * sizeof *m->slots);
  if (!m->slots) return TS_ENOMEM;
  memset(m->slots, 0xff, cap * sizeof *m->slots);
  m->cap = cap;
  m->keys = keys;
  m->key_len = key_len;
  return 0;
}

int tok_strmap_put(tok_strmap *m, int32_t id) {
  const char *k = m->keys[id];
  size_t kl = m->key_len[id];
  uint32_t i = hash_bytes(k, kl) & (m->cap - 1);
  for (;;) {
    int32_t s = m->slots[i];
    if (s < 0) {
      m->slots[i] = id;
      return 0;
    }
    if (m->key_len[s] == kl && !memcmp(m->keys[s], k, kl)) return 0;
    i = (i + 1) & (m->cap - 1);
  }
}

int32_t tok_strmap_get(const tok_strmap *m, const char *s, size_t len) {
  if (!m->slots) return -1;
  uint32_t i = hash_bytes(s, len) & (m->cap - 1);
  for (;;) {
    int32_t id = m->slots[i];
    if (id < 0) return -1;
    if (m->key_len[id] == len && !memcmp(m->keys[id], s, len)) return id;
    i = (i + 1) & (m->cap - 1);
  }
}

void tok_strmap_free(tok_strmap *m) {
  free(m->slots);
  m->slots = NULL;
}

static uint32_t hash_u64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  return (uint32_t)x;
}

int tok_mergemap_init(tok_mergemap *m, size_t n_expected) {
  uint32_t cap = 16;
  while (cap < n_expected * 2 + 16) cap *= 2;
  m->slots = malloc(cap * sizeof *m->slots);
  if (!m->slots) return TS_ENOMEM;
  for (uint32_t i = 0; i < cap; i++) m->slots[i].key = UINT64_MAX;
  m->cap = cap;
  return 0;
}

int tok_mergemap_put(tok_mergemap *m, int32_t a, int32_t b, int32_t rank, int32_t new_id) {
  uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
  uint32_t i = hash_u64(key) & (m->cap - 1);
  while (m->slots[i].key != UINT64_MAX) {
    if (m->slots[i].key == key) return 0;
    i = (i + 1) & (m->cap - 1);
  }
  m->slots[i].key = key;
  m->slots[i].rank = rank;
  m->slots[i].new_id = new_id;
  return 0;
}

const tok_merge *tok_mergemap_get(const tok_mergemap *m, int32_t a, int32_t b) {
  if (!m->slots) return NULL;
  uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
  uint32_t i = hash_u64(key) & (m->cap - 1);
  while (m->slots[i].key != UINT64_MAX) {
    if (m->slots[i].key == key) return &m->slots[i];
    i = (i + 1) & (m->cap - 1);
  }
  return NULL;
}

void tok_mergemap_free(tok_mergemap *m) {
  free(m->slots);
  m->slots = NULL;
}

/* Unicode Table 3-7 (well-formed byte sequences). */
int tok_utf8_seq(const unsigned char *s, size_t n, int *partial) {
  *partial = 0;
  if (n == 0) return 0;
  unsigned c = s[0];
  if (c < 0x80) return 1;
  int need;
  unsigned lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) need = 1;
  else if (c == 0xE0) need = 2, lo = 0xA0;
  else if (c >= 0xE1 && c <= 0xEC) need = 2;
  else if (c == 0xED) need = 2, hi = 0x9F;
  else if (c >= 0xEE && c <= 0xEF) need = 2;
  else if (c == 0xF0) need = 3, lo = 0x90;
  else if (c >= 0xF1 && c <= 0xF3) need = 3;
  else if (c == 0xF4) need = 3, hi = 0x8F;
  else return 0;
  for (int k = 1; k <= need; k++) {
    if ((size_t)k >= n) {
      *partial = 1;
      return 0;
    }
    unsigned d = s[k];
    if (k == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF)) return -k; /* breaks at byte k */
  }
  return need + 1;
}

int tok_utf8_lossy(tok_buf *out, const char *str, size_t n) {
  const unsigned char *s = (const unsigned char *)str;
  TS_TRY(tok_buf_reserve(out, n));
  size_t i = 0;
  while (i < n) {
    int partial;
    int k = tok_utf8_seq(s + i, n - i, &partial);
    if (k > 0) {
      TS_TRY(tok_buf_put(out, s + i, (size_t)k));
      i += (size_t)k;
      continue;
    }
    TS_TRY(tok_buf_put(out, "\xEF\xBF\xBD", 3));
    if (partial) break; /* the truncated tail is one maximal subpart */
    i += k < 0 ? (size_t)(-k) : 1;
  }
  return 0;
}

int tok_utf8_valid(const char *str, size_t n) {
  const unsigned char *s = (const unsigned char *)str;
  size_t i = 0;
  while (i < n) {
    int partial;
    int k = tok_utf8_seq(s + i, n - i, &partial);
    if (k <= 0) return 0;
    i += (size_t)k;
  }
  return 1;
}

int32_t tok_utf8_decode(const unsigned char *s, size_t n, int *len) {
  int partial;
  int k = tok_utf8_seq(s, n, &partial);
  if (k <= 0) {
    *len = 1;
    return 0xFFFD;
  }
  *len = k;
  if (k == 1) return s[0];
  if (k == 2) return ((s[0] & 0x1F) << 6) | (s[1] & 0x3F);
  if (k == 3) return ((s[0] & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F);
  return ((s[0] & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
}

int tok_utf8_encode(uint32_t cp, char out[4]) {
  if (cp < 0x80) {
    out[0] = (char)cp;
    return 1;
  }
  if (cp < 0x800) {
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    out[0] = (char)(0xE0 | (cp >> 12));
    out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
  }
  out[0] = (char)(0xF0 | (cp >> 18));
  out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
  out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
  out[3] = (char)(0x80 | (cp & 0x3F));
  return 4;
}

int tok_is_whitespace(int32_t c) {
  return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

int tok_is_alnum(int32_t c) {
  utf8proc_category_t k = utf8proc_category(c);
  return (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO) ||
         (k >= UTF8PROC_CATEGORY_ND && k <= UTF8PROC_CATEGORY_NO);
}

/* Printable bytes map to themselves; the rest (controls, space, 0x7F-0xA0, 0xAD) to 256+i. */
static int bl_printable(unsigned b) {
  return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
}

uint32_t tok_bytelevel_cp(uint8_t b) {
  if (bl_printable(b)) return b;
  if (b <= 32) return 256u + b;
  if (b <= 160) return 256u + 33 + (b - 127u);
  return 256u + 67; /* 0xAD */
}

int tok_bytelevel_byte(int32_t cp) {
  if (cp < 0) return -1;
  if (cp < 256) return bl_printable((unsigned)cp) ? cp : -1;
  int n = cp - 256;
  if (n < 33) return n;
  if (n < 67) return 127 + (n - 33);
  if (n == 67) return 0xAD;
  return -1;
}
