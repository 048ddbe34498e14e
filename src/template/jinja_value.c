/* Jinja values: arenas and buffers, containers, conversion from jansson, Python semantics of
 * truth, equality and ordering, and the str()/repr()/json.dumps() text forms. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "template/jinja_internal.h"

/* ---- arena ---- */

struct jarena_chunk {
  jarena_chunk *next;
  size_t used, cap;
  max_align_t data[];
};

void *jarena_alloc(jarena *a, size_t n) {
  n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
  if (n == 0) n = sizeof(max_align_t);
  jarena_chunk *c = a->head;
  if (!c || c->cap - c->used < n) {
    size_t cap = n > 65536 ? n : 65536;
    if (a->limit && (a->total + cap > a->limit || cap > a->limit)) return NULL;
    c = malloc(sizeof *c + cap);
    if (!c) return NULL;
    c->used = 0;
    c->cap = cap;
    /* A big one-off block goes behind the current chunk so the current one keeps filling. */
    if (a->head && cap == n) {
      c->next = a->head->next;
      a->head->next = c;
    } else {
      c->next = a->head;
      a->head = c;
    }
    a->total += cap;
  }
  void *p = (char *)c->data + c->used;
  c->used += n;
  memset(p, 0, n);
  return p;
}

void jarena_free(jarena *a) {
  jarena_chunk *c = a->head;
  while (c) {
    jarena_chunk *n = c->next;
    free(c);
    c = n;
  }
  a->head = NULL;
  a->total = 0;
}

/* ---- buffer ---- */

int jbuf_put(jbuf *b, const char *s, size_t n) {
  if (b->over) return -1;
  if (b->limit && b->len + n > b->limit) {
    b->over = 1;
    return -1;
  }
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->over = 1;
      return -1;
    }
    b->p = p;
    b->cap = cap;
  }
  if (n) memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = 0;
  return 0;
}

int jbuf_putc(jbuf *b, char c) { return jbuf_put(b, &c, 1); }

int jbuf_printf(jbuf *b, const char *fmt, ...) {
  char tmp[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n < 0) return -1;
  return jbuf_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

void jbuf_free(jbuf *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

/* ---- UTF-8 ---- */

size_t ju_next(const char *s, size_t n, size_t i) {
  unsigned char c = (unsigned char)s[i];
  size_t k = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  return i + k > n ? n : i + k;
}

int32_t ju_decode(const char *s, size_t n, size_t i) {
  utf8proc_int32_t cp = 0;
  if (utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp) <= 0) return 0xFFFD;
  return cp;
}

size_t ju_cplen(const char *s, size_t n) {
  size_t k = 0;
  for (size_t i = 0; i < n; i++)
    if (((unsigned char)s[i] & 0xC0) != 0x80) k++;
  return k;
}

size_t ju_offset(const char *s, size_t n, size_t cp) {
  size_t i = 0;
  while (cp > 0 && i < n) {
    i = ju_next(s, n, i);
    cp--;
  }
  return i;
}

int ju_isspace(int32_t c) {
  if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) return 1;
  if (c < 0x80) return 0;
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

/* ---- containers ---- */

const jstr *jstr_new(jarena *a, const char *s, size_t n) {
  jstr *j = jarena_alloc(a, sizeof(jstr) + n + 1);
  if (!j) return NULL;
  j->len = n;
  if (n) memcpy(j->s, s, n);
  j->s[n] = 0;
  return j;
}

int jv_str(jarena *a, const char *s, size_t n, jv *out) {
  const jstr *j = jstr_new(a, s, n);
  if (!j) return -1;
  out->kind = JV_STR;
  out->flags = 0;
  out->u.s = j;
  return 0;
}

jlist *jlist_new(jarena *a, size_t cap) {
  jlist *l = jarena_alloc(a, sizeof *l);
  if (!l) return NULL;
  if (cap) {
    l->v = jarena_alloc(a, cap * sizeof *l->v);
    if (!l->v) return NULL;
    l->cap = cap;
  }
  return l;
}

int jlist_push(jarena *a, jlist *l, jv v) {
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 4;
    jv *nv = jarena_alloc(a, cap * sizeof *nv);
    if (!nv) return -1;
    if (l->n) memcpy(nv, l->v, l->n * sizeof *nv);
    l->v = nv;
    l->cap = cap;
  }
  l->v[l->n++] = v;
  return 0;
}

jdict *jdict_new(jarena *a, size_t cap) {
  jdict *d = jarena_alloc(a, sizeof *d);
  if (!d) return NULL;
  if (cap) {
    d->k = jarena_alloc(a, cap * sizeof *d->k);
    d->v = jarena_alloc(a, cap * sizeof *d->v);
    if (!d->k || !d->v) return NULL;
    d->cap = cap;
  }
  return d;
}

jv *jdict_get(const jdict *d, jv k) {
  for (size_t i = 0; i < d->n; i++)
    if (jv_equal(&d->k[i], &k)) return &d->v[i];
  return NULL;
}

jv *jdict_get_str(const jdict *d, const char *k, size_t n) {
  for (size_t i = 0; i < d->n; i++)
    if (d->k[i].kind == JV_STR && d->k[i].u.s->len == n && memcmp(d->k[i].u.s->s, k, n) == 0) return &d->v[i];
  return NULL;
}

int jdict_set(jarena *a, jdict *d, jv k, jv v) {
  jv *old = jdict_get(d, k);
  if (old) {
    *old = v;
    return 0;
  }
  if (d->n == d->cap) {
    size_t cap = d->cap ? d->cap * 2 : 4;
    jv *nk = jarena_alloc(a, cap * sizeof *nk), *nv = jarena_alloc(a, cap * sizeof *nv);
    if (!nk || !nv) return -1;
    if (d->n) {
      memcpy(nk, d->k, d->n * sizeof *nk);
      memcpy(nv, d->v, d->n * sizeof *nv);
    }
    d->k = nk;
    d->v = nv;
    d->cap = cap;
  }
  d->k[d->n] = k;
  d->v[d->n] = v;
  d->n++;
  return 0;
}

/* -1 on OOM, -2 when nested too deeply. */
int jv_from_json(jarena *a, const json_t *j, jv *out, int depth) {
  if (depth > 200) return -2;
  memset(out, 0, sizeof *out);
  switch (json_typeof(j)) {
  case JSON_NULL: *out = jv_none(); return 0;
  case JSON_TRUE: *out = jv_bool(1); return 0;
  case JSON_FALSE: *out = jv_bool(0); return 0;
  case JSON_INTEGER: *out = jv_int((int64_t)json_integer_value(j)); return 0;
  case JSON_REAL: *out = jv_float(json_real_value(j)); return 0;
  case JSON_STRING: return jv_str(a, json_string_value(j), json_string_length(j), out);
  case JSON_ARRAY: {
    jlist *l = jlist_new(a, json_array_size(j));
    if (!l) return -1;
    for (size_t i = 0; i < json_array_size(j); i++) {
      int rc = jv_from_json(a, json_array_get(j, i), &l->v[i], depth + 1);
      if (rc < 0) return rc;
    }
    l->n = json_array_size(j);
    out->kind = JV_LIST;
    out->u.l = l;
    return 0;
  }
  case JSON_OBJECT: {
    jdict *d = jdict_new(a, json_object_size(j));
    if (!d) return -1;
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)j, k, v) {
      jv kv, vv;
      if (jv_str(a, k, strlen(k), &kv) < 0) return -1;
      int rc = jv_from_json(a, v, &vv, depth + 1);
      if (rc < 0) return rc;
      d->k[d->n] = kv;
      d->v[d->n] = vv;
      d->n++;
    }
    out->kind = JV_DICT;
    out->u.d = d;
    return 0;
  }
  }
  return -1;
}

/* ---- Python semantics ---- */

const char *jv_type_name(const jv *v) {
  switch (v->kind) {
  case JV_UNDEF: return "Undefined";
  case JV_NONE: return "NoneType";
  case JV_BOOL: return "bool";
  case JV_INT: return "int";
  case JV_FLOAT: return "float";
  case JV_STR: return "str";
  case JV_LIST: return (v->flags & JV_F_TUPLE) ? "tuple" : "list";
  case JV_DICT: return (v->flags & JV_F_LOOP) ? "LoopContext" : "dict";
  case JV_NS: return "Namespace";
  default: return "function";
  }
}

int jv_truthy(const jv *v) {
  switch (v->kind) {
  case JV_UNDEF: case JV_NONE: return 0;
  case JV_BOOL: return v->u.b;
  case JV_INT: return v->u.i != 0;
  case JV_FLOAT: return v->u.f != 0.0;
  case JV_STR: return v->u.s->len != 0;
  case JV_LIST: return v->u.l->n != 0;
  case JV_DICT: return (v->flags & JV_F_LOOP) ? 1 : v->u.d->n != 0;
  default: return 1;
  }
}

int jv_is_number(const jv *v) { return v->kind == JV_INT || v->kind == JV_FLOAT || v->kind == JV_BOOL; }

double jv_num(const jv *v) {
  return v->kind == JV_FLOAT ? v->u.f : v->kind == JV_INT ? (double)v->u.i : (double)v->u.b;
}

static int64_t jv_intval(const jv *v) { return v->kind == JV_INT ? v->u.i : v->u.b; }

/* Values can nest deeply (a list wrapped in itself in a loop); past this depth comparisons give
 * up (unequal / unordered) and printing fails, instead of exhausting the stack. */
#define JV_MAX_NEST 256

static int equal_d(const jv *a, const jv *b, int depth);

int jv_equal(const jv *a, const jv *b) { return equal_d(a, b, 0); }

static int equal_d(const jv *a, const jv *b, int depth) {
  if (depth > JV_MAX_NEST) return 0;
  if (jv_is_number(a) && jv_is_number(b)) {
    if (a->kind != JV_FLOAT && b->kind != JV_FLOAT) return jv_intval(a) == jv_intval(b);
    return jv_num(a) == jv_num(b);
  }
  if (a->kind != b->kind) return 0;
  switch (a->kind) {
  case JV_UNDEF: case JV_NONE: return 1;
  case JV_STR: return a->u.s->len == b->u.s->len && memcmp(a->u.s->s, b->u.s->s, a->u.s->len) == 0;
  case JV_LIST:
    if ((a->flags & JV_F_TUPLE) != (b->flags & JV_F_TUPLE) || a->u.l->n != b->u.l->n) return 0;
    for (size_t i = 0; i < a->u.l->n; i++)
      if (!equal_d(&a->u.l->v[i], &b->u.l->v[i], depth + 1)) return 0;
    return 1;
  case JV_DICT:
    if (a->u.d == b->u.d) return 1;
    if ((a->flags | b->flags) & JV_F_LOOP) return 0;
    if (a->u.d->n != b->u.d->n) return 0;
    for (size_t i = 0; i < a->u.d->n; i++) {
      jv *o = jdict_get(b->u.d, a->u.d->k[i]);
      if (!o || !equal_d(&a->u.d->v[i], o, depth + 1)) return 0;
    }
    return 1;
  case JV_NS: return a->u.d == b->u.d;
  case JV_FUNC: return a->u.fn == b->u.fn;
  default: return 0;
  }
}

static int compare_d(const jv *a, const jv *b, int depth);

int jv_compare(const jv *a, const jv *b) { return compare_d(a, b, 0); }

static int compare_d(const jv *a, const jv *b, int depth) {
  if (depth > JV_MAX_NEST) return -2;
  if (jv_is_number(a) && jv_is_number(b)) {
    if (a->kind != JV_FLOAT && b->kind != JV_FLOAT) {
      int64_t x = jv_intval(a), y = jv_intval(b);
      return x < y ? -1 : x > y;
    }
    double x = jv_num(a), y = jv_num(b);
    return x < y ? -1 : x > y ? 1 : 0; /* NaN compares as equal here; Python says False to all */
  }
  if (a->kind == JV_STR && b->kind == JV_STR) {
    /* Byte order of UTF-8 is code point order. */
    size_t n = a->u.s->len < b->u.s->len ? a->u.s->len : b->u.s->len;
    int c = memcmp(a->u.s->s, b->u.s->s, n);
    if (c) return c < 0 ? -1 : 1;
    return a->u.s->len < b->u.s->len ? -1 : a->u.s->len > b->u.s->len;
  }
  if (a->kind == JV_LIST && b->kind == JV_LIST && (a->flags & JV_F_TUPLE) == (b->flags & JV_F_TUPLE)) {
    size_t n = a->u.l->n < b->u.l->n ? a->u.l->n : b->u.l->n;
    for (size_t i = 0; i < n; i++) {
      if (equal_d(&a->u.l->v[i], &b->u.l->v[i], depth + 1)) continue;
      return compare_d(&a->u.l->v[i], &b->u.l->v[i], depth + 1);
    }
    return a->u.l->n < b->u.l->n ? -1 : a->u.l->n > b->u.l->n;
  }
  return -2;
}

/* ---- text forms ---- */

void jv_float_repr(char *out, size_t n, double f) {
  if (isnan(f)) {
    snprintf(out, n, "nan");
    return;
  }
  if (isinf(f)) {
    snprintf(out, n, f < 0 ? "-inf" : "inf");
    return;
  }
  /* Shortest digits that round-trip, laid out the way Python's float repr does. */
  char buf[64];
  int prec;
  for (prec = 1; prec <= 17; prec++) {
    snprintf(buf, sizeof buf, "%.*e", prec - 1, f);
    if (strtod(buf, NULL) == f) break;
  }
  /* buf = [-]d.ddde[+-]xx */
  char digits[32];
  int nd = 0, neg = buf[0] == '-';
  const char *p = buf + neg;
  for (; *p && *p != 'e'; p++)
    if (*p >= '0' && *p <= '9') digits[nd++] = *p;
  int exp = atoi(p + 1);
  while (nd > 1 && digits[nd - 1] == '0') nd--;
  digits[nd] = 0;
  char *o = out;
  size_t left = n;
#define PUT(...)                                          \
  do {                                                    \
    int w_ = snprintf(o, left, __VA_ARGS__);              \
    if (w_ < 0 || (size_t)w_ >= left) return;             \
    o += w_;                                              \
    left -= (size_t)w_;                                   \
  } while (0)
  if (neg) PUT("-");
  if (exp < -4 || exp >= 16) {
    PUT("%c", digits[0]);
    if (nd > 1) PUT(".%s", digits + 1);
    PUT("e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
  } else if (exp < 0) {
    PUT("0.");
    for (int i = 0; i < -exp - 1; i++) PUT("0");
    PUT("%s", digits);
  } else {
    for (int i = 0; i <= exp; i++) PUT("%c", i < nd ? digits[i] : '0');
    PUT(".");
    if (nd > exp + 1) PUT("%s", digits + exp + 1);
    else PUT("0");
  }
#undef PUT
}

static int put_str_repr(jbuf *b, const jstr *s) {
  int has_sq = memchr(s->s, '\'', s->len) != NULL, has_dq = memchr(s->s, '"', s->len) != NULL;
  char q = (has_sq && !has_dq) ? '"' : '\'';
  if (jbuf_putc(b, q) < 0) return -1;
  for (size_t i = 0; i < s->len;) {
    size_t nx = ju_next(s->s, s->len, i);
    int32_t c = ju_decode(s->s, s->len, i);
    int rc;
    if (c == q || c == '\\') {
      char e[2] = {'\\', (char)c};
      rc = jbuf_put(b, e, 2);
    } else if (c == '\n') rc = jbuf_put(b, "\\n", 2);
    else if (c == '\r') rc = jbuf_put(b, "\\r", 2);
    else if (c == '\t') rc = jbuf_put(b, "\\t", 2);
    else if (c < 0x20 || c == 0x7F) rc = jbuf_printf(b, "\\x%02x", (unsigned)c);
    else if (c < 0x80) rc = jbuf_putc(b, (char)c);
    else {
      /* Python escapes what str.isprintable() rejects: control, format, separators, unassigned. */
      utf8proc_category_t cat = utf8proc_category(c);
      int printable = !(cat == UTF8PROC_CATEGORY_CC || cat == UTF8PROC_CATEGORY_CF || cat == UTF8PROC_CATEGORY_CS ||
                        cat == UTF8PROC_CATEGORY_CO || cat == UTF8PROC_CATEGORY_CN || cat == UTF8PROC_CATEGORY_ZL ||
                        cat == UTF8PROC_CATEGORY_ZP || cat == UTF8PROC_CATEGORY_ZS);
      if (printable) rc = jbuf_put(b, s->s + i, nx - i);
      else if (c < 0x100) rc = jbuf_printf(b, "\\x%02x", (unsigned)c);
      else if (c < 0x10000) rc = jbuf_printf(b, "\\u%04x", (unsigned)c);
      else rc = jbuf_printf(b, "\\U%08x", (unsigned)c);
    }
    if (rc < 0) return -1;
    i = nx;
  }
  return jbuf_putc(b, q);
}

static int repr_d(jbuf *b, const jv *v, int depth);

int jv_repr(jbuf *b, const jv *v) { return repr_d(b, v, 0); }

static int repr_d(jbuf *b, const jv *v, int depth) {
  if (depth > JV_MAX_NEST) {
    b->over = 1;
    return -1;
  }
  switch (v->kind) {
  case JV_STR: return put_str_repr(b, v->u.s);
  case JV_LIST: {
    int tup = v->flags & JV_F_TUPLE;
    if (jbuf_putc(b, tup ? '(' : '[') < 0) return -1;
    for (size_t i = 0; i < v->u.l->n; i++) {
      if (i && jbuf_put(b, ", ", 2) < 0) return -1;
      if (repr_d(b, &v->u.l->v[i], depth + 1) < 0) return -1;
    }
    if (tup && v->u.l->n == 1 && jbuf_putc(b, ',') < 0) return -1;
    return jbuf_putc(b, tup ? ')' : ']');
  }
  case JV_DICT:
    if (!(v->flags & JV_F_LOOP)) {
      if (jbuf_putc(b, '{') < 0) return -1;
      for (size_t i = 0; i < v->u.d->n; i++) {
        if (i && jbuf_put(b, ", ", 2) < 0) return -1;
        if (repr_d(b, &v->u.d->k[i], depth + 1) < 0 || jbuf_put(b, ": ", 2) < 0 ||
            repr_d(b, &v->u.d->v[i], depth + 1) < 0)
          return -1;
      }
      return jbuf_putc(b, '}');
    }
    return jbuf_printf(b, "<LoopContext>");
  case JV_UNDEF: return jbuf_put(b, "Undefined", 9);
  case JV_NS: {
    jv d = {.kind = JV_DICT};
    d.u.d = v->u.d;
    if (jbuf_put(b, "<Namespace ", 11) < 0 || repr_d(b, &d, depth + 1) < 0) return -1;
    return jbuf_putc(b, '>');
  }
  default: return jv_to_str(b, v);
  }
}

int jv_to_str(jbuf *b, const jv *v) {
  char tmp[64];
  switch (v->kind) {
  case JV_UNDEF: return 0;
  case JV_NONE: return jbuf_put(b, "None", 4);
  case JV_BOOL: return v->u.b ? jbuf_put(b, "True", 4) : jbuf_put(b, "False", 5);
  case JV_INT: return jbuf_printf(b, "%lld", (long long)v->u.i);
  case JV_FLOAT: jv_float_repr(tmp, sizeof tmp, v->u.f); return jbuf_put(b, tmp, strlen(tmp));
  case JV_STR: return jbuf_put(b, v->u.s->s, v->u.s->len);
  case JV_NS: return jv_repr(b, v);
  case JV_FUNC: return jbuf_printf(b, "<function>");
  default: return jv_repr(b, v);
  }
}

static int json_str(jbuf *b, const char *s, size_t n, int ensure_ascii) {
  if (jbuf_putc(b, '"') < 0) return -1;
  size_t run = 0;
  for (size_t i = 0; i < n;) {
    unsigned char c = (unsigned char)s[i];
    const char *esc = NULL;
    char tmp[16];
    size_t nx = i + 1;
    if (c == '"') esc = "\\\"";
    else if (c == '\\') esc = "\\\\";
    else if (c == '\n') esc = "\\n";
    else if (c == '\r') esc = "\\r";
    else if (c == '\t') esc = "\\t";
    else if (c == '\b') esc = "\\b";
    else if (c == '\f') esc = "\\f";
    else if (c < 0x20) {
      snprintf(tmp, sizeof tmp, "\\u%04x", c);
      esc = tmp;
    } else if (c >= 0x80 && ensure_ascii) {
      nx = ju_next(s, n, i);
      int32_t cp = ju_decode(s, n, i);
      if (cp >= 0x10000) {
        cp -= 0x10000;
        snprintf(tmp, sizeof tmp, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
      } else {
        snprintf(tmp, sizeof tmp, "\\u%04x", (unsigned)cp);
      }
      esc = tmp;
    }
    if (esc) {
      if (jbuf_put(b, s + run, i - run) < 0 || jbuf_put(b, esc, strlen(esc)) < 0) return -1;
      run = nx;
    }
    i = nx;
  }
  if (jbuf_put(b, s + run, n - run) < 0) return -1;
  return jbuf_putc(b, '"');
}

static int json_nl(jbuf *b, int indent, int level) {
  if (jbuf_putc(b, '\n') < 0) return -1;
  for (int i = 0; i < indent * level; i++)
    if (jbuf_putc(b, ' ') < 0) return -1;
  return 0;
}

/* Sorted key order for sort_keys: indices of string keys by code point order. */
static int key_less(const jv *a, const jv *b) { return jv_compare(a, b) < 0; }

int jv_tojson(jbuf *b, const jv *v, int indent, int ensure_ascii, int sort_keys, int level, const jv **bad) {
  char tmp[64];
  if (level > 200) {
    *bad = v;
    return -2;
  }
  switch (v->kind) {
  case JV_NONE: return jbuf_put(b, "null", 4);
  case JV_BOOL: return v->u.b ? jbuf_put(b, "true", 4) : jbuf_put(b, "false", 5);
  case JV_INT: return jbuf_printf(b, "%lld", (long long)v->u.i);
  case JV_FLOAT:
    if (isnan(v->u.f)) return jbuf_put(b, "NaN", 3);
    if (isinf(v->u.f)) return v->u.f < 0 ? jbuf_put(b, "-Infinity", 9) : jbuf_put(b, "Infinity", 8);
    jv_float_repr(tmp, sizeof tmp, v->u.f);
    return jbuf_put(b, tmp, strlen(tmp));
  case JV_STR: return json_str(b, v->u.s->s, v->u.s->len, ensure_ascii);
  case JV_LIST: {
    const jlist *l = v->u.l;
    if (!l->n) return jbuf_put(b, "[]", 2);
    if (jbuf_putc(b, '[') < 0) return -1;
    for (size_t i = 0; i < l->n; i++) {
      if (i && jbuf_put(b, indent >= 0 ? "," : ", ", indent >= 0 ? 1 : 2) < 0) return -1;
      if (indent >= 0 && json_nl(b, indent, level + 1) < 0) return -1;
      int rc = jv_tojson(b, &l->v[i], indent, ensure_ascii, sort_keys, level + 1, bad);
      if (rc < 0) return rc;
    }
    if (indent >= 0 && json_nl(b, indent, level) < 0) return -1;
    return jbuf_putc(b, ']');
  }
  case JV_DICT: {
    if (v->flags & JV_F_LOOP) break;
    const jdict *d = v->u.d;
    if (!d->n) return jbuf_put(b, "{}", 2);
    size_t order_small[64], *order = order_small;
    if (d->n > 64 && !(order = malloc(d->n * sizeof *order))) return -1;
    for (size_t i = 0; i < d->n; i++) order[i] = i;
    int rc = 0;
    for (size_t i = 0; i < d->n && rc == 0; i++) {
      const jv *k = &d->k[i];
      if (k->kind != JV_STR && k->kind != JV_INT && k->kind != JV_FLOAT && k->kind != JV_BOOL && k->kind != JV_NONE) {
        *bad = k;
        rc = -2;
      }
      if (sort_keys && k->kind != JV_STR) { /* Python cannot order mixed key types either */
        *bad = k;
        rc = -2;
      }
    }
    if (sort_keys && rc == 0)
      for (size_t i = 1; i < d->n; i++)
        for (size_t j = i; j > 0 && key_less(&d->k[order[j]], &d->k[order[j - 1]]); j--) {
          size_t t = order[j];
          order[j] = order[j - 1];
          order[j - 1] = t;
        }
    if (rc == 0 && jbuf_putc(b, '{') < 0) rc = -1;
    for (size_t ii = 0; ii < d->n && rc == 0; ii++) {
      size_t i = order[ii];
      if (ii && jbuf_put(b, indent >= 0 ? "," : ", ", indent >= 0 ? 1 : 2) < 0) rc = -1;
      if (rc == 0 && indent >= 0 && json_nl(b, indent, level + 1) < 0) rc = -1;
      const jv *k = &d->k[i];
      if (rc == 0) {
        /* Non-string keys become strings the way json.dumps converts them. */
        if (k->kind == JV_STR) rc = json_str(b, k->u.s->s, k->u.s->len, ensure_ascii);
        else if (k->kind == JV_NONE) rc = jbuf_put(b, "\"null\"", 6);
        else if (k->kind == JV_BOOL) rc = jbuf_put(b, k->u.b ? "\"true\"" : "\"false\"", k->u.b ? 6 : 7);
        else {
          jbuf kb = {0};
          rc = jv_tojson(&kb, k, -1, 1, 0, level + 1, bad);
          if (rc == 0) rc = json_str(b, kb.p, kb.len, ensure_ascii);
          jbuf_free(&kb);
        }
      }
      if (rc == 0 && jbuf_put(b, ": ", 2) < 0) rc = -1;
      if (rc == 0) rc = jv_tojson(b, &d->v[i], indent, ensure_ascii, sort_keys, level + 1, bad);
    }
    if (order != order_small) free(order);
    if (rc < 0) return rc;
    if (indent >= 0 && json_nl(b, indent, level) < 0) return -1;
    return jbuf_putc(b, '}');
  }
  default: break;
  }
  *bad = v;
  return -2;
}
