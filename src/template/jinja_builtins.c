/* Jinja builtins: the filters, tests, global functions (range, namespace, raise_exception,
 * strftime_now ...) and Python str/dict methods that chat templates call, with jinja2's and
 * transformers' semantics (tojson is json.dumps(ensure_ascii=False)). */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <utf8proc.h>

#include "template/jinja_internal.h"

/* ---- name tables ---- */

#define FILTERS(X)                                                                                       \
  X(ABS, "abs") X(CAPITALIZE, "capitalize") X(COUNT, "count") X(D, "d") X(DEFAULT, "default")             \
  X(FIRST, "first") X(FLOAT, "float") X(INT, "int") X(ITEMS, "items") X(JOIN, "join") X(LAST, "last")     \
  X(LENGTH, "length") X(LIST, "list") X(LOWER, "lower") X(MAP, "map") X(REJECT, "reject")                 \
  X(REJECTATTR, "rejectattr") X(REPLACE, "replace") X(REVERSE, "reverse") X(SAFE, "safe")                 \
  X(SELECT, "select") X(SELECTATTR, "selectattr") X(STRING, "string") X(SUM, "sum") X(TITLE, "title")     \
  X(TOJSON, "tojson") X(TRIM, "trim") X(UPPER, "upper") X(SORT, "sort") X(DICTSORT, "dictsort")          \
  X(UNIQUE, "unique") X(INDENT, "indent")

#define TESTS(X)                                                                                         \
  X(BOOLEAN, "boolean") X(CALLABLE, "callable") X(DEFINED, "defined") X(DIVISIBLEBY, "divisibleby")       \
  X(EQ, "eq") X(EQUALTO, "equalto") X(EQEQ, "==") X(NE, "ne") X(NEQ, "!=") X(EVEN, "even") X(ODD, "odd")  \
  X(FALSE, "false") X(TRUE, "true") X(FLOAT, "float") X(INTEGER, "integer") X(GE, "ge") X(GEOP, ">=")     \
  X(GT, "gt") X(GTOP, ">") X(GREATERTHAN, "greaterthan") X(LE, "le") X(LEOP, "<=") X(LT, "lt")             \
  X(LTOP, "<") X(LESSTHAN, "lessthan") X(IN, "in") X(ITERABLE, "iterable") X(LOWER, "lower")              \
  X(UPPER, "upper") X(MAPPING, "mapping") X(NONE, "none") X(NUMBER, "number") X(SAMEAS, "sameas")          \
  X(SEQUENCE, "sequence") X(STRING, "string") X(UNDEFINED, "undefined")

#define GLOBALS(X) \
  X(RANGE, "range") X(NAMESPACE, "namespace") X(DICT, "dict") X(RAISE, "raise_exception") X(STRFTIME, "strftime_now")

#define STR_METHODS(X)                                                                                  \
  X(STARTSWITH, "startswith") X(ENDSWITH, "endswith") X(STRIP, "strip") X(LSTRIP, "lstrip")              \
  X(RSTRIP, "rstrip") X(SPLIT, "split") X(RSPLIT, "rsplit") X(REPLACE, "replace") X(LOWER, "lower")      \
  X(UPPER, "upper") X(TITLE, "title") X(CAPITALIZE, "capitalize") X(FIND, "find") X(COUNT, "count")      \
  X(JOIN, "join") X(REMOVEPREFIX, "removeprefix") X(REMOVESUFFIX, "removesuffix")                        \
  X(SPLITLINES, "splitlines") X(ISSPACE, "isspace") X(ISDIGIT, "isdigit") X(ISALPHA, "isalpha")          \
  X(ISALNUM, "isalnum") X(ISLOWER, "islower") X(ISUPPER, "isupper")

#define DICT_METHODS(X) X(ITEMS, "items") X(KEYS, "keys") X(VALUES, "values") X(GET, "get")

#define ENUM_F(id, name) F_##id,
#define ENUM_T(id, name) T_##id,
#define ENUM_G(id, name) G_##id,
#define ENUM_S(id, name) M_S_##id,
#define ENUM_D(id, name) M_D_##id,
#define NAME(id, name) name,

enum { FILTERS(ENUM_F) F_COUNT_ };
enum { TESTS(ENUM_T) T_COUNT_ };
enum { GLOBALS(ENUM_G) G_COUNT_ };
/* Method ids: str methods, then dict methods, then loop.cycle, then known-but-unsupported names. */
enum { STR_METHODS(ENUM_S) M_S_COUNT_ };
enum { DICT_METHODS(ENUM_D) M_D_COUNT_ };
#define M_DICT_BASE 100
#define M_CYCLE 200
#define M_UNSUPPORTED 300

static const char *const filter_names[] = {FILTERS(NAME)};
static const char *const test_names[] = {TESTS(NAME)};
static const char *const global_names[] = {GLOBALS(NAME)};
static const char *const str_method_names[] = {STR_METHODS(NAME)};
static const char *const dict_method_names[] = {DICT_METHODS(NAME)};
_Static_assert(sizeof filter_names / sizeof *filter_names == F_COUNT_, "filter table");
_Static_assert(sizeof test_names / sizeof *test_names == T_COUNT_, "test table");

/* Python's other str/dict/list methods: they exist (so attribute access is not undefined) but
 * calling them is unsupported. */
static const char *const other_methods[] = {
    "casefold", "center", "encode", "expandtabs", "format", "format_map", "index", "isascii", "isdecimal",
    "isidentifier", "isnumeric", "isprintable", "istitle", "ljust", "maketrans", "partition", "rfind", "rindex",
    "rjust", "rpartition", "swapcase", "translate", "zfill", "clear", "copy", "fromkeys", "pop", "popitem",
    "setdefault", "update", "append", "extend", "insert", "remove", "reverse", "sort"};

static int find_name(const char *const *tab, int n, const char *s, size_t len) {
  for (int i = 0; i < n; i++)
    if (strlen(tab[i]) == len && memcmp(tab[i], s, len) == 0) return i;
  return -1;
}

int jinja_filter_id(const char *name, size_t n) { return find_name(filter_names, F_COUNT_, name, n); }
int jinja_test_id(const char *name, size_t n) { return find_name(test_names, T_COUNT_, name, n); }
int jinja_global_id(const char *name, size_t n) { return find_name(global_names, G_COUNT_, name, n); }
const char *jinja_filter_name(int id) { return id >= 0 && id < F_COUNT_ ? filter_names[id] : "?"; }
const char *jinja_test_name(int id) { return id >= 0 && id < T_COUNT_ ? test_names[id] : "?"; }

static int other_method(const char *name, size_t n, int kind) {
  /* indices: str-only 0..22, dict 23..29 (clear copy fromkeys pop popitem setdefault update),
   * list 30.. plus clear/copy/pop shared by dict and list. */
  int i = find_name(other_methods, (int)(sizeof other_methods / sizeof *other_methods), name, n);
  if (i < 0) return -1;
  int is_str = i <= 22, is_dict = i >= 23 && i <= 29, is_list = i >= 30 || i == 23 || i == 24 || i == 26;
  if (kind == JV_STR && (is_str || !strcmp(other_methods[i], "index") || !strcmp(other_methods[i], "rfind"))) return i;
  if (kind == JV_DICT && is_dict) return i;
  if (kind == JV_LIST && (is_list || !strcmp(other_methods[i], "index"))) return i;
  return -1;
}

int jinja_method_id(const jv *self, const char *name, size_t n) {
  int i;
  switch (self->kind) {
  case JV_STR:
    if ((i = find_name(str_method_names, M_S_COUNT_, name, n)) >= 0) return i;
    break;
  case JV_DICT:
    if (self->flags & JV_F_LOOP) return (n == 5 && !memcmp(name, "cycle", 5)) ? M_CYCLE : -1;
    if ((i = find_name(dict_method_names, M_D_COUNT_, name, n)) >= 0) return M_DICT_BASE + i;
    break;
  case JV_LIST:
    if (n == 5 && !memcmp(name, "count", 5)) return M_UNSUPPORTED + 1000;
    break;
  default: return -1;
  }
  i = other_method(name, n, self->kind);
  return i >= 0 ? M_UNSUPPORTED + i : -1;
}

/* ---- helpers ---- */

int jinja_bind_args(jrender *r, int line, const char *what, const jargs *a, const char *const *names, int n,
                    const jv **slots) {
  for (int i = 0; i < n; i++) slots[i] = NULL;
  if (a->npos > (size_t)n) return jr_fail(r, line, "%s got too many arguments", what);
  for (size_t i = 0; i < a->npos; i++) slots[i] = &a->pos[i];
  for (size_t k = 0; k < a->nkw; k++) {
    int found = -1;
    for (int i = 0; i < n; i++)
      if (strlen(names[i]) == a->kwl[k] && !memcmp(names[i], a->kwn[k], a->kwl[k])) found = i;
    if (found < 0) return jr_fail(r, line, "%s got an unexpected keyword argument '%.*s'", what, (int)a->kwl[k], a->kwn[k]);
    if (slots[found]) return jr_fail(r, line, "%s got multiple values for argument '%s'", what, names[found]);
    slots[found] = &a->kw[k];
  }
  return 0;
}

#define bind jinja_bind_args

static int mkstr(jrender *r, int line, const char *s, size_t n, jv *out) {
  if (jv_str(&r->arena, s, n, out) < 0) return jr_oom(r, line);
  return 0;
}

static int buf_to_str(jrender *r, int line, jbuf *b, jv *out) {
  int over = b->over;
  int rc = over ? -1 : jv_str(&r->arena, b->p ? b->p : "", b->len, out);
  jbuf_free(b);
  if (rc < 0) return over ? jr_fail(r, line, "string result too long") : jr_oom(r, line);
  return 0;
}

/* str(v) as a string value. */
static int to_str(jrender *r, int line, jv v, jv *out) {
  if (v.kind == JV_STR) {
    *out = v;
    out->flags = 0;
    return 0;
  }
  jbuf b = {.limit = r->lim.max_output};
  jv_to_str(&b, &v);
  return buf_to_str(r, line, &b, out);
}

static int need_str(jrender *r, int line, const char *what, const jv *v) {
  if (v->kind == JV_STR) return 0;
  if (v->kind == JV_UNDEF) return jinja_undef_error(r, line, v);
  return jr_fail(r, line, "%s argument must be str, not %s", what, jv_type_name(v));
}

static int mklist(jrender *r, int line, size_t cap, jlist **out) {
  *out = jlist_new(&r->arena, cap);
  return *out ? 0 : jr_oom(r, line);
}

static jv list_val(jlist *l, int tuple) {
  jv v = {.kind = JV_LIST, .flags = (uint8_t)(tuple ? JV_F_TUPLE : 0)};
  v.u.l = l;
  return v;
}

static int pair(jrender *r, int line, jv a, jv b, jv *out) {
  jlist *l;
  TS_TRY(mklist(r, line, 2, &l));
  l->v[0] = a;
  l->v[1] = b;
  l->n = 2;
  *out = list_val(l, 1);
  return 0;
}

/* Maps every code point through f (a utf8proc case mapping); mode 1: capitalize, 2: str.title. */
static int case_map(jrender *r, int line, const jstr *s, utf8proc_int32_t (*f)(utf8proc_int32_t), int mode, jv *out) {
  jbuf b = {.limit = r->lim.max_output};
  int prev_cased = 0;
  size_t k = 0;
  for (size_t i = 0; i < s->len; k++) {
    int32_t c = ju_decode(s->s, s->len, i);
    int32_t m;
    if (mode == 1) m = k == 0 ? utf8proc_totitle(c) : utf8proc_tolower(c);
    else if (mode == 2) m = prev_cased ? utf8proc_tolower(c) : utf8proc_totitle(c);
    else m = f(c);
    utf8proc_category_t cat = utf8proc_category(c);
    prev_cased = cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL || cat == UTF8PROC_CATEGORY_LT;
    utf8proc_uint8_t enc[4];
    utf8proc_ssize_t el = utf8proc_encode_char(m, enc);
    jbuf_put(&b, (const char *)enc, (size_t)el);
    i = ju_next(s->s, s->len, i);
  }
  return buf_to_str(r, line, &b, out);
}

static int in_set(int32_t c, const jstr *chars) {
  for (size_t i = 0; i < chars->len;) {
    if (ju_decode(chars->s, chars->len, i) == c) return 1;
    i = ju_next(chars->s, chars->len, i);
  }
  return 0;
}

/* Python str.strip family: which: 1 left, 2 right, 3 both; chars NULL: whitespace. */
static int do_strip(jrender *r, int line, const jstr *s, const jstr *chars, int which, jv *out) {
  size_t b = 0, e = s->len;
  if (which & 1)
    while (b < e) {
      int32_t c = ju_decode(s->s, s->len, b);
      if (chars ? !in_set(c, chars) : !ju_isspace(c)) break;
      b = ju_next(s->s, s->len, b);
    }
  if (which & 2) {
    size_t i = b, keep = b;
    while (i < e) {
      int32_t c = ju_decode(s->s, s->len, i);
      size_t nx = ju_next(s->s, s->len, i);
      if (chars ? !in_set(c, chars) : !ju_isspace(c)) keep = nx;
      i = nx;
    }
    e = keep;
  }
  return mkstr(r, line, s->s + b, e - b, out);
}

static int strip_args(jrender *r, int line, const char *what, const jv *chars, const jstr **out) {
  *out = NULL;
  if (!chars || chars->kind == JV_NONE) return 0;
  TS_TRY(need_str(r, line, what, chars));
  *out = chars->u.s;
  return 0;
}

/* Python str.split / rsplit. sep NULL: runs of whitespace. */
static int do_split(jrender *r, int line, const jstr *s, const jstr *sep, int64_t maxsplit, int from_right, jv *out) {
  jlist *l;
  TS_TRY(mklist(r, line, 0, &l));
  const char *p = s->s;
  size_t n = s->len;
  if (sep && sep->len == 0) return jr_fail(r, line, "empty separator");
  if (!from_right) {
    size_t i = 0;
    int64_t splits = 0;
    if (sep) {
      for (;;) {
        const char *hit = (maxsplit < 0 || splits < maxsplit) ? memmem(p + i, n - i, sep->s, sep->len) : NULL;
        size_t end = hit ? (size_t)(hit - p) : n;
        jv piece;
        TS_TRY(mkstr(r, line, p + i, end - i, &piece));
        if (jlist_push(&r->arena, l, piece) < 0) return jr_oom(r, line);
        if (!hit) break;
        i = end + sep->len;
        splits++;
      }
    } else {
      for (;;) {
        while (i < n && ju_isspace(ju_decode(p, n, i))) i = ju_next(p, n, i);
        if (i >= n) break;
        size_t st = i;
        if (maxsplit >= 0 && splits >= maxsplit) {
          /* The remainder keeps its trailing whitespace... except Python strips it only on the left. */
          jv piece;
          TS_TRY(mkstr(r, line, p + st, n - st, &piece));
          if (jlist_push(&r->arena, l, piece) < 0) return jr_oom(r, line);
          break;
        }
        while (i < n && !ju_isspace(ju_decode(p, n, i))) i = ju_next(p, n, i);
        jv piece;
        TS_TRY(mkstr(r, line, p + st, i - st, &piece));
        if (jlist_push(&r->arena, l, piece) < 0) return jr_oom(r, line);
        splits++;
      }
    }
  } else {
    /* Collect pieces right to left, then reverse. */
    size_t e = n;
    int64_t splits = 0;
    if (sep) {
      for (;;) {
        const char *hit = NULL;
        if ((maxsplit < 0 || splits < maxsplit) && e >= sep->len)
          for (size_t k = e - sep->len + 1; k-- > 0;)
            if (!memcmp(p + k, sep->s, sep->len)) {
              hit = p + k;
              break;
            }
        size_t st = hit ? (size_t)(hit - p) + sep->len : 0;
        jv piece;
        TS_TRY(mkstr(r, line, p + st, e - st, &piece));
        if (jlist_push(&r->arena, l, piece) < 0) return jr_oom(r, line);
        if (!hit) break;
        e = (size_t)(hit - p);
        splits++;
      }
    } else {
      /* Whitespace rsplit: walk code points backwards via an offset table. */
      size_t cps = ju_cplen(p, n), k = 0;
      size_t *off = malloc((cps + 1) * sizeof *off);
      if (!off) return jr_oom(r, line);
      for (size_t i = 0; i < n; i = ju_next(p, n, i)) off[k++] = i;
      off[k] = n;
      size_t j = cps; /* code point index of the end */
      int rc = 0;
      for (;;) {
        while (j > 0 && ju_isspace(ju_decode(p, n, off[j - 1]))) j--;
        if (j == 0) break;
        size_t end = j;
        if (maxsplit >= 0 && splits >= maxsplit) {
          jv piece;
          if ((rc = mkstr(r, line, p, off[end], &piece)) < 0) break;
          if (jlist_push(&r->arena, l, piece) < 0) { rc = jr_oom(r, line); break; }
          break;
        }
        while (j > 0 && !ju_isspace(ju_decode(p, n, off[j - 1]))) j--;
        jv piece;
        if ((rc = mkstr(r, line, p + off[j], off[end] - off[j], &piece)) < 0) break;
        if (jlist_push(&r->arena, l, piece) < 0) { rc = jr_oom(r, line); break; }
        splits++;
      }
      free(off);
      if (rc < 0) return rc;
    }
    for (size_t a = 0, b = l->n ? l->n - 1 : 0; a < b; a++, b--) {
      jv t = l->v[a];
      l->v[a] = l->v[b];
      l->v[b] = t;
    }
  }
  *out = list_val(l, 0);
  return 0;
}

static int do_replace(jrender *r, int line, const jstr *s, const jstr *old, const jstr *new_, int64_t count, jv *out) {
  jbuf b = {.limit = r->lim.max_output};
  int64_t done = 0;
  if (old->len == 0) {
    /* Python inserts new before every code point and at the end. */
    size_t i = 0;
    for (;;) {
      if (count < 0 || done < count) {
        jbuf_put(&b, new_->s, new_->len);
        done++;
      }
      if (i >= s->len) break;
      size_t nx = ju_next(s->s, s->len, i);
      jbuf_put(&b, s->s + i, nx - i);
      i = nx;
    }
    return buf_to_str(r, line, &b, out);
  }
  size_t i = 0;
  while (i <= s->len) {
    const char *hit = (count < 0 || done < count) ? memmem(s->s + i, s->len - i, old->s, old->len) : NULL;
    if (!hit) {
      jbuf_put(&b, s->s + i, s->len - i);
      break;
    }
    jbuf_put(&b, s->s + i, (size_t)(hit - s->s) - i);
    jbuf_put(&b, new_->s, new_->len);
    i = (size_t)(hit - s->s) + old->len;
    done++;
  }
  return buf_to_str(r, line, &b, out);
}

static int get_int(jrender *r, int line, const char *what, const jv *v, int64_t *out) {
  if (v->kind == JV_INT) *out = v->u.i;
  else if (v->kind == JV_BOOL) *out = v->u.b;
  else if (v->kind == JV_UNDEF) return jinja_undef_error(r, line, v);
  else return jr_fail(r, line, "%s: '%s' object cannot be interpreted as an integer", what, jv_type_name(v));
  return 0;
}

/* Python int(str) for base 10 (whitespace, sign, single underscores between digits). */
static int parse_py_int(const jstr *s, int base, int64_t *out) {
  size_t b = 0, e = s->len;
  while (b < e && ju_isspace(ju_decode(s->s, s->len, b))) b = ju_next(s->s, s->len, b);
  while (e > b) {
    size_t k = e - 1;
    while (k > b && ((unsigned char)s->s[k] & 0xC0) == 0x80) k--;
    if (!ju_isspace(ju_decode(s->s, s->len, k))) break;
    e = k;
  }
  int neg = 0;
  if (b < e && (s->s[b] == '+' || s->s[b] == '-')) neg = s->s[b++] == '-';
  if (b >= e) return -1;
  uint64_t acc = 0;
  int prev_digit = 0;
  for (size_t i = b; i < e; i++) {
    char c = s->s[i];
    int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'z' ? c - 'a' + 10 : c >= 'A' && c <= 'Z' ? c - 'A' + 10 : -1;
    if (c == '_' && prev_digit && i + 1 < e) {
      prev_digit = 0;
      continue;
    }
    if (d < 0 || d >= base) return -1;
    if (acc > (UINT64_MAX - (uint64_t)d) / (uint64_t)base) return -2;
    acc = acc * (uint64_t)base + (uint64_t)d;
    prev_digit = 1;
  }
  if (!prev_digit) return -1;
  if (acc > (uint64_t)INT64_MAX + (uint64_t)neg) return -2;
  *out = neg ? (int64_t)(0 - acc) : (int64_t)acc;
  return 0;
}

/* Python float(str). */
static int parse_py_float(const jstr *s, double *out) {
  char buf[128];
  size_t b = 0, e = s->len, k = 0;
  while (b < e && ju_isspace(ju_decode(s->s, s->len, b))) b = ju_next(s->s, s->len, b);
  while (e > b && (unsigned char)s->s[e - 1] < 0x80 && ju_isspace((unsigned char)s->s[e - 1])) e--;
  if (e - b == 0 || e - b >= sizeof buf) return -1;
  for (size_t i = b; i < e; i++) {
    char c = s->s[i];
    if (c == '_') {
      int ok = i > b && i + 1 < e && s->s[i - 1] >= '0' && s->s[i - 1] <= '9' && s->s[i + 1] >= '0' && s->s[i + 1] <= '9';
      if (!ok) return -1;
      continue;
    }
    if (!strchr("0123456789+-.eEinfatyINFATY", c) || !c) return -1;
    buf[k++] = c;
  }
  buf[k] = 0;
  const char *p = buf + (buf[0] == '+' || buf[0] == '-');
  if (!strcasecmp(p, "inf") || !strcasecmp(p, "infinity") || !strcasecmp(p, "nan")) {
    double v = (p[0] == 'n' || p[0] == 'N') ? NAN : INFINITY;
    *out = buf[0] == '-' ? -v : v;
    return 0;
  }
  /* Plain decimal: digits [. digits] [e [sign] digits], at least one digit in the mantissa. */
  const char *q = p;
  int digs = 0;
  while (*q >= '0' && *q <= '9') q++, digs++;
  if (*q == '.') {
    q++;
    while (*q >= '0' && *q <= '9') q++, digs++;
  }
  if (!digs) return -1;
  if (*q == 'e' || *q == 'E') {
    q++;
    if (*q == '+' || *q == '-') q++;
    if (!(*q >= '0' && *q <= '9')) return -1;
    while (*q >= '0' && *q <= '9') q++;
  }
  if (*q) return -1;
  *out = strtod(buf, NULL);
  return 0;
}

static int len_of(jrender *r, int line, const jv *v, int64_t *out) {
  switch (v->kind) {
  case JV_UNDEF: *out = 0; return 0;
  case JV_STR: *out = (int64_t)ju_cplen(v->u.s->s, v->u.s->len); return 0;
  case JV_LIST: *out = (int64_t)v->u.l->n; return 0;
  case JV_DICT:
    if (v->flags & JV_F_LOOP) {
      jv *len = jdict_get_str(v->u.d, "length", 6);
      *out = len ? len->u.i : 0;
      return 0;
    }
    *out = (int64_t)v->u.d->n;
    return 0;
  default: return jr_fail(r, line, "object of type '%s' has no len()", jv_type_name(v));
  }
}

int jinja_attr_get(jrender *r, int line, jv item, const jstr *attr, jv *out) {
  const char *p = attr->s, *end = attr->s + attr->len;
  *out = item;
  while (p <= end) {
    const char *dot = memchr(p, '.', (size_t)(end - p));
    size_t n = dot ? (size_t)(dot - p) : (size_t)(end - p);
    jv key;
    int isnum = n > 0;
    for (size_t i = 0; i < n; i++)
      if (p[i] < '0' || p[i] > '9') isnum = 0;
    if (isnum && n < 18) key = jv_int(strtoll(p, NULL, 10));
    else TS_TRY(mkstr(r, line, p, n, &key));
    TS_TRY(jinja_getitem(r, line, *out, key, out));
    if (!dot) break;
    p = dot + 1;
  }
  return 0;
}

/* select/reject/selectattr/rejectattr: test name in args[first], test args after. */
/* jinja2's select/reject/map treat any falsy input as empty ("if value: for item in value"). */
static int iterate_if_truthy(jrender *r, int line, jv seq, jlist **items) {
  if (!jv_truthy(&seq)) return mklist(r, line, 0, items);
  return jinja_iterate(r, line, seq, items);
}

static int select_items(jrender *r, int line, jv seq, const jargs *a, int use_attr, int want, jv *out) {
  jlist *items, *res;
  TS_TRY(iterate_if_truthy(r, line, seq, &items));
  TS_TRY(mklist(r, line, items->n, &res));
  size_t k = 0;
  const jstr *attr = NULL;
  if (a->nkw) return jr_fail(r, line, "keyword arguments to select/reject are unsupported");
  if (use_attr) {
    if (a->npos < 1) return jr_fail(r, line, "selectattr/rejectattr need an attribute name");
    TS_TRY(need_str(r, line, "attribute", &a->pos[0]));
    attr = a->pos[0].u.s;
    k = 1;
  }
  int test = -1;
  if (a->npos > k) {
    TS_TRY(need_str(r, line, "test name", &a->pos[k]));
    test = jinja_test_id(a->pos[k].u.s->s, a->pos[k].u.s->len);
    if (test < 0) return jr_fail(r, line, "unsupported test '%.60s'", a->pos[k].u.s->s);
    k++;
  }
  /* A call with no arguments has no array at all (pos is NULL): no pointer arithmetic on it. */
  jargs targs = {.pos = a->npos > k ? a->pos + k : NULL, .npos = a->npos - k};
  for (size_t i = 0; i < items->n; i++) {
    jv v = items->v[i];
    if (attr) TS_TRY(jinja_attr_get(r, line, v, attr, &v));
    int res_ok;
    if (test >= 0) TS_TRY(jinja_apply_test(r, line, test, v, &targs, &res_ok));
    else res_ok = jv_truthy(&v);
    if (res_ok == want) res->v[res->n++] = items->v[i];
  }
  *out = list_val(res, 0);
  return 0;
}

/* ---- filters ---- */

static int f_tojson(jrender *r, int line, jv in, const jargs *a, jv *out) {
  static const char *const names[] = {"ensure_ascii", "indent", "separators", "sort_keys"};
  const jv *s[4];
  TS_TRY(bind(r, line, "filter 'tojson'", a, names, 4, s));
  int indent = -1, ea = 0, sk = 0;
  if (s[0]) ea = jv_truthy(s[0]);
  if (s[1] && s[1]->kind != JV_NONE) {
    int64_t i = 0;
    TS_TRY(get_int(r, line, "tojson indent", s[1], &i));
    indent = i < 0 ? 0 : i > 64 ? 64 : (int)i; /* json.dumps treats a negative indent as 0 */
  }
  if (s[2] && s[2]->kind != JV_NONE) return jr_fail(r, line, "unsupported tojson argument 'separators'");
  if (s[3]) sk = jv_truthy(s[3]);
  jbuf b = {.limit = r->lim.max_output};
  const jv *bad = NULL;
  int rc = jv_tojson(&b, &in, indent, ea, sk, 0, &bad);
  if (rc == -2) {
    jbuf_free(&b);
    if (bad && bad->kind == JV_UNDEF) return jr_fail(r, line, "Object of type Undefined is not JSON serializable");
    return jr_fail(r, line, "Object of type %s is not JSON serializable", bad ? jv_type_name(bad) : "?");
  }
  return buf_to_str(r, line, &b, out);
}

static int f_join(jrender *r, int line, jv in, const jargs *a, jv *out) {
  static const char *const names[] = {"d", "attribute"};
  const jv *s[2];
  TS_TRY(bind(r, line, "filter 'join'", a, names, 2, s));
  jlist *items;
  TS_TRY(jinja_iterate(r, line, in, &items));
  jv sep;
  if (s[0]) TS_TRY(to_str(r, line, *s[0], &sep));
  else TS_TRY(mkstr(r, line, "", 0, &sep));
  const jstr *attr = NULL;
  if (s[1] && s[1]->kind != JV_NONE) {
    TS_TRY(need_str(r, line, "attribute", s[1]));
    attr = s[1]->u.s;
  }
  jbuf b = {.limit = r->lim.max_output};
  for (size_t i = 0; i < items->n; i++) {
    jv v = items->v[i];
    if (attr) {
      int rc = jinja_attr_get(r, line, v, attr, &v);
      if (rc < 0) {
        jbuf_free(&b);
        return rc;
      }
    }
    if (i) jbuf_put(&b, sep.u.s->s, sep.u.s->len);
    jv_to_str(&b, &v);
  }
  return buf_to_str(r, line, &b, out);
}

static int f_map(jrender *r, int line, jv in, const jargs *a, jv *out) {
  jlist *items, *res;
  TS_TRY(iterate_if_truthy(r, line, in, &items));
  TS_TRY(mklist(r, line, items->n, &res));
  const jstr *attr = NULL;
  const jv *dflt = NULL;
  for (size_t k = 0; k < a->nkw; k++) {
    if (a->kwl[k] == 9 && !memcmp(a->kwn[k], "attribute", 9)) {
      TS_TRY(need_str(r, line, "attribute", &a->kw[k]));
      attr = a->kw[k].u.s;
    } else if (a->kwl[k] == 7 && !memcmp(a->kwn[k], "default", 7)) {
      dflt = &a->kw[k];
    } else {
      return jr_fail(r, line, "filter 'map' got an unexpected keyword argument '%.*s'", (int)a->kwl[k], a->kwn[k]);
    }
  }
  if (attr) {
    if (a->npos) return jr_fail(r, line, "filter 'map' takes no positional arguments with attribute=");
    for (size_t i = 0; i < items->n; i++) {
      jv v;
      TS_TRY(jinja_attr_get(r, line, items->v[i], attr, &v));
      if (v.kind == JV_UNDEF && dflt) v = *dflt;
      res->v[res->n++] = v;
    }
  } else {
    if (!a->npos) return jr_fail(r, line, "filter 'map' needs a filter name or attribute=");
    TS_TRY(need_str(r, line, "filter name", &a->pos[0]));
    int f = jinja_filter_id(a->pos[0].u.s->s, a->pos[0].u.s->len);
    if (f < 0) return jr_fail(r, line, "unsupported filter '%.60s'", a->pos[0].u.s->s);
    jargs fa = {.pos = a->pos + 1, .npos = a->npos - 1};
    for (size_t i = 0; i < items->n; i++) TS_TRY(jinja_apply_filter(r, line, f, items->v[i], &fa, &res->v[res->n++]));
  }
  *out = list_val(res, 0);
  return 0;
}

static int f_int(jrender *r, int line, jv in, const jargs *a, jv *out) {
  static const char *const names[] = {"default", "base"};
  const jv *s[2];
  TS_TRY(bind(r, line, "filter 'int'", a, names, 2, s));
  jv dflt = s[0] ? *s[0] : jv_int(0);
  if (in.kind == JV_UNDEF) return jinja_undef_error(r, line, &in);
  int64_t base = 10;
  if (s[1]) TS_TRY(get_int(r, line, "int base", s[1], &base));
  if (base < 2 || base > 36) return jr_fail(r, line, "int() base must be >= 2 and <= 36");
  switch (in.kind) {
  case JV_INT: *out = in; return 0;
  case JV_BOOL: *out = jv_int(in.u.b); return 0;
  case JV_FLOAT:
    if (isnan(in.u.f) || isinf(in.u.f) || fabs(in.u.f) >= 9.2e18) return jr_fail(r, line, "cannot convert float to integer");
    *out = jv_int((int64_t)in.u.f);
    return 0;
  case JV_STR: {
    int64_t i;
    int rc = parse_py_int(in.u.s, (int)base, &i);
    if (rc == -2) return jr_fail(r, line, "integer too large");
    if (rc == 0) {
      *out = jv_int(i);
      return 0;
    }
    double f;
    if (parse_py_float(in.u.s, &f) == 0) {
      if (isnan(f) || isinf(f) || fabs(f) >= 9.2e18) return jr_fail(r, line, "cannot convert float to integer");
      *out = jv_int((int64_t)f);
      return 0;
    }
    *out = dflt;
    return 0;
  }
  default: *out = dflt; return 0;
  }
}

static int f_float(jrender *r, int line, jv in, const jargs *a, jv *out) {
  static const char *const names[] = {"default"};
  const jv *s[1];
  TS_TRY(bind(r, line, "filter 'float'", a, names, 1, s));
  jv dflt = s[0] ? *s[0] : jv_float(0.0);
  if (in.kind == JV_UNDEF) return jinja_undef_error(r, line, &in);
  double f;
  if (jv_is_number(&in)) *out = jv_float(jv_num(&in));
  else if (in.kind == JV_STR && parse_py_float(in.u.s, &f) == 0) *out = jv_float(f);
  else *out = dflt;
  return 0;
}

/* jinja2's title filter: upper-case the first character of each word, where words start after
 * runs of '-', whitespace, '(', '{', '[' or '<'. */
static int f_title(jrender *r, int line, const jstr *s, jv *out) {
  jbuf b = {.limit = r->lim.max_output};
  int at_start = 1;
  for (size_t i = 0; i < s->len;) {
    int32_t c = ju_decode(s->s, s->len, i);
    int sep = ju_isspace(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
    int32_t m = sep ? c : at_start ? utf8proc_toupper(c) : utf8proc_tolower(c);
    at_start = sep;
    utf8proc_uint8_t enc[4];
    utf8proc_ssize_t el = utf8proc_encode_char(m, enc);
    jbuf_put(&b, (const char *)enc, (size_t)el);
    i = ju_next(s->s, s->len, i);
  }
  return buf_to_str(r, line, &b, out);
}

static int f_first_last(jrender *r, int line, jv in, int last, jv *out) {
  if (in.kind == JV_UNDEF) {
    *out = in;
    return 0;
  }
  jlist *items;
  TS_TRY(jinja_iterate(r, line, in, &items));
  if (!items->n) *out = jv_undef(last ? "No last item, sequence was empty." : "No first item, sequence was empty.");
  else *out = items->v[last ? items->n - 1 : 0];
  return 0;
}

int jinja_apply_filter(jrender *r, int line, int id, jv in, const jargs *a, jv *out) {
  const jv *s[3];
  switch (id) {
  case F_TOJSON: return f_tojson(r, line, in, a, out);
  case F_JOIN: return f_join(r, line, in, a, out);
  case F_MAP: return f_map(r, line, in, a, out);
  case F_INT: return f_int(r, line, in, a, out);
  case F_FLOAT: return f_float(r, line, in, a, out);
  case F_SELECT: return select_items(r, line, in, a, 0, 1, out);
  case F_REJECT: return select_items(r, line, in, a, 0, 0, out);
  case F_SELECTATTR: return select_items(r, line, in, a, 1, 1, out);
  case F_REJECTATTR: return select_items(r, line, in, a, 1, 0, out);
  case F_FIRST: return f_first_last(r, line, in, 0, out);
  case F_SORT: case F_DICTSORT: case F_UNIQUE: case F_INDENT:
    return jinja_filter_sorting(r, line, id == F_SORT ? 0 : id == F_DICTSORT ? 1 : id == F_UNIQUE ? 2 : 3, in, a, out);
  case F_LAST: return f_first_last(r, line, in, 1, out);
  default: break;
  }
  const char *what = filter_names[id];
  char nm[48];
  snprintf(nm, sizeof nm, "filter '%s'", what);
  switch (id) {
  case F_D:
  case F_DEFAULT: {
    static const char *const names[] = {"default_value", "boolean"};
    TS_TRY(bind(r, line, nm, a, names, 2, s));
    int use_default = in.kind == JV_UNDEF || (s[1] && jv_truthy(s[1]) && !jv_truthy(&in));
    if (!use_default) *out = in;
    else if (s[0]) *out = *s[0];
    else TS_TRY(mkstr(r, line, "", 0, out));
    return 0;
  }
  case F_TRIM: {
    static const char *const names[] = {"chars"};
    TS_TRY(bind(r, line, nm, a, names, 1, s));
    jv str;
    const jstr *chars;
    TS_TRY(to_str(r, line, in, &str));
    TS_TRY(strip_args(r, line, "trim", s[0], &chars));
    return do_strip(r, line, str.u.s, chars, 3, out);
  }
  case F_REPLACE: {
    static const char *const names[] = {"old", "new", "count"};
    TS_TRY(bind(r, line, nm, a, names, 3, s));
    if (!s[0] || !s[1]) return jr_fail(r, line, "filter 'replace' needs old and new");
    jv str, o, nw;
    TS_TRY(to_str(r, line, in, &str));
    TS_TRY(to_str(r, line, *s[0], &o));
    TS_TRY(to_str(r, line, *s[1], &nw));
    int64_t count = -1;
    if (s[2] && s[2]->kind != JV_NONE) TS_TRY(get_int(r, line, "replace count", s[2], &count));
    return do_replace(r, line, str.u.s, o.u.s, nw.u.s, count, out);
  }
  default: break;
  }
  if (a->npos || a->nkw) {
    if (id != F_SUM) return jr_fail(r, line, "%s takes no arguments", nm);
  }
  switch (id) {
  case F_ABS:
    if (in.kind == JV_FLOAT) *out = jv_float(fabs(in.u.f));
    else if (in.kind == JV_INT || in.kind == JV_BOOL) {
      int64_t i = in.kind == JV_INT ? in.u.i : in.u.b;
      if (i == INT64_MIN) return jr_fail(r, line, "integer overflow");
      *out = jv_int(i < 0 ? -i : i);
    } else if (in.kind == JV_UNDEF) return jinja_undef_error(r, line, &in);
    else return jr_fail(r, line, "bad operand type for abs(): '%s'", jv_type_name(&in));
    return 0;
  case F_COUNT:
  case F_LENGTH: {
    int64_t n = 0;
    TS_TRY(len_of(r, line, &in, &n));
    *out = jv_int(n);
    return 0;
  }
  case F_ITEMS: {
    jlist *l;
    if (in.kind == JV_UNDEF) {
      TS_TRY(mklist(r, line, 0, &l));
    } else if (in.kind == JV_DICT && !(in.flags & JV_F_LOOP)) {
      TS_TRY(mklist(r, line, in.u.d->n, &l));
      for (size_t i = 0; i < in.u.d->n; i++) TS_TRY(pair(r, line, in.u.d->k[i], in.u.d->v[i], &l->v[l->n++]));
    } else {
      return jr_fail(r, line, "Can only get item pairs from a mapping.");
    }
    *out = list_val(l, 0);
    return 0;
  }
  case F_LIST: {
    jlist *items, *l;
    TS_TRY(jinja_iterate(r, line, in, &items));
    TS_TRY(mklist(r, line, items->n, &l));
    if (items->n) memcpy(l->v, items->v, items->n * sizeof(jv));
    l->n = items->n;
    *out = list_val(l, 0);
    return 0;
  }
  case F_REVERSE: {
    if (in.kind == JV_STR) {
      jbuf b = {.limit = r->lim.max_output};
      size_t i = in.u.s->len;
      while (i > 0) {
        size_t st = i - 1;
        while (st > 0 && ((unsigned char)in.u.s->s[st] & 0xC0) == 0x80) st--;
        jbuf_put(&b, in.u.s->s + st, i - st);
        i = st;
      }
      return buf_to_str(r, line, &b, out);
    }
    jlist *items, *l;
    TS_TRY(jinja_iterate(r, line, in, &items));
    TS_TRY(mklist(r, line, items->n, &l));
    for (size_t i = 0; i < items->n; i++) l->v[i] = items->v[items->n - 1 - i];
    l->n = items->n;
    *out = list_val(l, 0);
    return 0;
  }
  case F_SAFE:
  case F_STRING: return to_str(r, line, in, out);
  case F_LOWER:
  case F_UPPER:
  case F_CAPITALIZE:
  case F_TITLE: {
    jv str;
    TS_TRY(to_str(r, line, in, &str));
    if (id == F_TITLE) return f_title(r, line, str.u.s, out);
    if (id == F_CAPITALIZE) return case_map(r, line, str.u.s, NULL, 1, out);
    return case_map(r, line, str.u.s, id == F_LOWER ? utf8proc_tolower : utf8proc_toupper, 0, out);
  }
  case F_SUM: {
    static const char *const names[] = {"attribute", "start"};
    TS_TRY(bind(r, line, nm, a, names, 2, s));
    jlist *items;
    TS_TRY(jinja_iterate(r, line, in, &items));
    jv acc = s[1] ? *s[1] : jv_int(0);
    for (size_t i = 0; i < items->n; i++) {
      jv v = items->v[i];
      if (s[0] && s[0]->kind != JV_NONE) {
        TS_TRY(need_str(r, line, "attribute", s[0]));
        TS_TRY(jinja_attr_get(r, line, v, s[0]->u.s, &v));
      }
      if (!jv_is_number(&acc) || !jv_is_number(&v))
        return jr_fail(r, line, "unsupported operand type(s) for +: '%s' and '%s'", jv_type_name(&acc), jv_type_name(&v));
      if (acc.kind == JV_FLOAT || v.kind == JV_FLOAT) acc = jv_float(jv_num(&acc) + jv_num(&v));
      else {
        int64_t z;
        if (__builtin_add_overflow((int64_t)jv_num(&acc), (int64_t)jv_num(&v), &z)) return jr_fail(r, line, "integer overflow");
        acc = jv_int(z);
      }
    }
    *out = acc;
    return 0;
  }
  default: return jr_fail(r, line, "unsupported filter '%s'", what);
  }
}

/* ---- tests ---- */

int jinja_apply_test(jrender *r, int line, int id, jv in, const jargs *a, int *out) {
  const jv *arg = a->npos ? &a->pos[0] : a->nkw ? &a->kw[0] : NULL;
  int needs_arg = id == T_DIVISIBLEBY || id == T_EQ || id == T_EQUALTO || id == T_EQEQ || id == T_NE || id == T_NEQ ||
                  id == T_GE || id == T_GEOP || id == T_GT || id == T_GTOP || id == T_GREATERTHAN || id == T_LE ||
                  id == T_LEOP || id == T_LT || id == T_LTOP || id == T_LESSTHAN || id == T_IN || id == T_SAMEAS;
  if (needs_arg && (!arg || a->npos + a->nkw != 1)) return jr_fail(r, line, "test '%s' takes one argument", test_names[id]);
  if (!needs_arg && (a->npos || a->nkw)) return jr_fail(r, line, "test '%s' takes no arguments", test_names[id]);
  switch (id) {
  case T_DEFINED: *out = in.kind != JV_UNDEF; return 0;
  case T_UNDEFINED: *out = in.kind == JV_UNDEF; return 0;
  case T_NONE: *out = in.kind == JV_NONE; return 0;
  case T_BOOLEAN: *out = in.kind == JV_BOOL; return 0;
  case T_TRUE: *out = in.kind == JV_BOOL && in.u.b; return 0;
  case T_FALSE: *out = in.kind == JV_BOOL && !in.u.b; return 0;
  case T_STRING: *out = in.kind == JV_STR; return 0;
  case T_MAPPING: *out = in.kind == JV_DICT && !(in.flags & JV_F_LOOP); return 0;
  case T_NUMBER: *out = jv_is_number(&in); return 0;
  case T_INTEGER: *out = in.kind == JV_INT; return 0;
  case T_FLOAT: *out = in.kind == JV_FLOAT; return 0;
  case T_CALLABLE: *out = in.kind == JV_FUNC || in.kind == JV_UNDEF; return 0;
  case T_ITERABLE: *out = in.kind == JV_STR || in.kind == JV_LIST || in.kind == JV_DICT || in.kind == JV_UNDEF; return 0;
  case T_SEQUENCE:
    *out = in.kind == JV_STR || in.kind == JV_LIST || (in.kind == JV_DICT && !(in.flags & JV_F_LOOP)) || in.kind == JV_UNDEF;
    return 0;
  case T_EQ: case T_EQUALTO: case T_EQEQ: *out = jv_equal(&in, arg); return 0;
  case T_NE: case T_NEQ: *out = !jv_equal(&in, arg); return 0;
  case T_IN: {
    jv hay = *arg;
    if (hay.kind == JV_UNDEF) {
      *out = 0;
      return 0;
    }
    if (hay.kind == JV_STR) {
      if (in.kind != JV_STR) return jr_fail(r, line, "'in <string>' requires string as left operand, not %s", jv_type_name(&in));
      *out = in.u.s->len == 0 || memmem(hay.u.s->s, hay.u.s->len, in.u.s->s, in.u.s->len) != NULL;
      return 0;
    }
    if (hay.kind == JV_LIST) {
      *out = 0;
      for (size_t i = 0; i < hay.u.l->n && !*out; i++) *out = jv_equal(&hay.u.l->v[i], &in);
      return 0;
    }
    if (hay.kind == JV_DICT && !(hay.flags & JV_F_LOOP)) {
      if ((in.kind == JV_LIST && !(in.flags & JV_F_TUPLE)) || in.kind == JV_DICT || in.kind == JV_NS)
        return jr_fail(r, line, "unhashable type: '%s'", jv_type_name(&in));
      *out = jdict_get(hay.u.d, in) != NULL;
      return 0;
    }
    return jr_fail(r, line, "argument of type '%s' is not iterable", jv_type_name(&hay));
  }
  case T_SAMEAS:
    if (in.kind == JV_NONE || in.kind == JV_BOOL) *out = in.kind == arg->kind && (in.kind == JV_NONE || in.u.b == arg->u.b);
    else if (in.kind == JV_INT) *out = arg->kind == JV_INT && in.u.i == arg->u.i && in.u.i >= -5 && in.u.i <= 256;
    else if (in.kind == JV_LIST || in.kind == JV_DICT || in.kind == JV_NS) *out = in.kind == arg->kind && in.u.l == arg->u.l;
    else *out = 0;
    return 0;
  case T_LOWER:
  case T_UPPER: {
    jv str;
    TS_TRY(to_str(r, line, in, &str));
    int cased = 0, ok = 1;
    for (size_t i = 0; i < str.u.s->len; i = ju_next(str.u.s->s, str.u.s->len, i)) {
      int32_t c = ju_decode(str.u.s->s, str.u.s->len, i);
      utf8proc_category_t cat = utf8proc_category(c);
      if (cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LT) {
        cased = 1;
        if (id == T_LOWER) ok = 0;
      } else if (cat == UTF8PROC_CATEGORY_LL) {
        cased = 1;
        if (id == T_UPPER) ok = 0;
      }
    }
    *out = cased && ok;
    return 0;
  }
  default: break;
  }
  /* Numeric tests and ordering. */
  if (id == T_EVEN || id == T_ODD || id == T_DIVISIBLEBY) {
    if (in.kind == JV_UNDEF) return jinja_undef_error(r, line, &in);
    if (!jv_is_number(&in) || (arg && !jv_is_number(arg)))
      return jr_fail(r, line, "test '%s' needs numbers, got '%s'", test_names[id], jv_type_name(&in));
    double m = id == T_DIVISIBLEBY ? jv_num(arg) : 2.0;
    if (m == 0.0) return jr_fail(r, line, "modulo by zero");
    double x = jv_num(&in), rem = fmod(x, m);
    if (rem != 0.0 && ((rem < 0) != (m < 0))) rem += m;
    *out = id == T_ODD ? rem == 1.0 : rem == 0.0;
    return 0;
  }
  if (in.kind == JV_UNDEF) return jinja_undef_error(r, line, &in);
  if (arg->kind == JV_UNDEF) return jinja_undef_error(r, line, arg);
  int c = jv_compare(&in, arg);
  if (c == -2)
    return jr_fail(r, line, "test '%s' cannot compare '%s' and '%s'", test_names[id], jv_type_name(&in), jv_type_name(arg));
  switch (id) {
  case T_GE: case T_GEOP: *out = c >= 0; return 0;
  case T_GT: case T_GTOP: case T_GREATERTHAN: *out = c > 0; return 0;
  case T_LE: case T_LEOP: *out = c <= 0; return 0;
  default: *out = c < 0; return 0;
  }
}

/* ---- globals ---- */

static int kwargs_into(jrender *r, int line, jdict *d, const jargs *a) {
  for (size_t k = 0; k < a->nkw; k++) {
    jv key;
    TS_TRY(mkstr(r, line, a->kwn[k], a->kwl[k], &key));
    if (jdict_set(&r->arena, d, key, a->kw[k]) < 0) return jr_oom(r, line);
  }
  return 0;
}

int jinja_call_global(jrender *r, int line, int id, const jargs *a, jv *out) {
  switch (id) {
  case G_RANGE: {
    if (a->nkw || a->npos < 1 || a->npos > 3) return jr_fail(r, line, "range() takes 1 to 3 positional arguments");
    int64_t v[3] = {0, 0, 1};
    for (size_t i = 0; i < a->npos; i++) TS_TRY(get_int(r, line, "range()", &a->pos[i], &v[i]));
    int64_t start = a->npos == 1 ? 0 : v[0], stop = a->npos == 1 ? v[0] : v[1], stp = a->npos == 3 ? v[2] : 1;
    if (stp == 0) return jr_fail(r, line, "range() arg 3 must not be zero");
    double cntf = stp > 0 ? ceil(((double)stop - (double)start) / (double)stp) : ceil(((double)start - (double)stop) / (double)-stp);
    if (cntf < 0) cntf = 0;
    /* The sandbox's MAX_RANGE. */
    if (cntf > 100000) return jr_fail(r, line, "Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
    size_t cnt = (size_t)cntf;
    jlist *l;
    TS_TRY(mklist(r, line, cnt, &l));
    for (size_t i = 0; i < cnt; i++) l->v[i] = jv_int(start + (int64_t)i * stp);
    l->n = cnt;
    *out = list_val(l, 0);
    return 0;
  }
  case G_NAMESPACE:
  case G_DICT: {
    jdict *d = jdict_new(&r->arena, a->npos + a->nkw);
    if (!d) return jr_oom(r, line);
    if (a->npos > 1) return jr_fail(r, line, "%s() takes at most 1 positional argument", global_names[id]);
    if (a->npos) {
      const jv *src = &a->pos[0];
      if (src->kind == JV_DICT && !(src->flags & JV_F_LOOP)) {
        for (size_t i = 0; i < src->u.d->n; i++)
          if (jdict_set(&r->arena, d, src->u.d->k[i], src->u.d->v[i]) < 0) return jr_oom(r, line);
      } else if (src->kind == JV_LIST) {
        for (size_t i = 0; i < src->u.l->n; i++) {
          const jv *p = &src->u.l->v[i];
          if (p->kind != JV_LIST || p->u.l->n != 2) return jr_fail(r, line, "%s() sequence elements must be pairs", global_names[id]);
          if (jdict_set(&r->arena, d, p->u.l->v[0], p->u.l->v[1]) < 0) return jr_oom(r, line);
        }
      } else {
        return jr_fail(r, line, "%s() argument must be a mapping, not '%s'", global_names[id], jv_type_name(src));
      }
    }
    TS_TRY(kwargs_into(r, line, d, a));
    out->kind = id == G_NAMESPACE ? JV_NS : JV_DICT;
    out->flags = 0;
    out->u.d = d;
    return 0;
  }
  case G_RAISE: {
    jbuf b = {.limit = TS_ERR_MSG_MAX};
    for (size_t i = 0; i < a->npos; i++) jv_to_str(&b, &a->pos[i]);
    int rc = ts_errorf(r->err, TS_EINVAL, "%s", b.p ? b.p : "");
    jbuf_free(&b);
    return rc;
  }
  case G_STRFTIME: {
    if (a->npos != 1 || a->nkw) return jr_fail(r, line, "strftime_now() takes one argument");
    TS_TRY(need_str(r, line, "strftime_now", &a->pos[0]));
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    char buf[512];
    size_t n = a->pos[0].u.s->len ? strftime(buf, sizeof buf, a->pos[0].u.s->s, &tm) : 0;
    return mkstr(r, line, buf, n, out);
  }
  default: return jr_fail(r, line, "unsupported function");
  }
}

/* ---- methods ---- */

static int m_prefix(jrender *r, int line, const jstr *s, const jv *arg, int suffix, int *out) {
  if (arg->kind == JV_LIST && (arg->flags & JV_F_TUPLE)) {
    *out = 0;
    for (size_t i = 0; i < arg->u.l->n && !*out; i++) TS_TRY(m_prefix(r, line, s, &arg->u.l->v[i], suffix, out));
    return 0;
  }
  if (arg->kind != JV_STR)
    return jr_fail(r, line, "%s first arg must be str or a tuple of str, not %s", suffix ? "endswith" : "startswith",
                   jv_type_name(arg));
  const jstr *p = arg->u.s;
  *out = p->len <= s->len && !memcmp(suffix ? s->s + s->len - p->len : s->s, p->s, p->len);
  return 0;
}

static int str_method(jrender *r, int line, const jstr *s, int id, const jargs *a, jv *out) {
  const jv *v[3];
  char nm[48];
  snprintf(nm, sizeof nm, "str.%s()", str_method_names[id]);
  switch (id) {
  case M_S_STARTSWITH:
  case M_S_ENDSWITH: {
    static const char *const names[] = {"prefix"};
    TS_TRY(bind(r, line, nm, a, names, 1, v));
    if (!v[0]) return jr_fail(r, line, "%s takes at least 1 argument", nm);
    int res;
    TS_TRY(m_prefix(r, line, s, v[0], id == M_S_ENDSWITH, &res));
    *out = jv_bool(res);
    return 0;
  }
  case M_S_STRIP:
  case M_S_LSTRIP:
  case M_S_RSTRIP: {
    static const char *const names[] = {"chars"};
    TS_TRY(bind(r, line, nm, a, names, 1, v));
    const jstr *chars;
    TS_TRY(strip_args(r, line, nm, v[0], &chars));
    return do_strip(r, line, s, chars, id == M_S_STRIP ? 3 : id == M_S_LSTRIP ? 1 : 2, out);
  }
  case M_S_SPLIT:
  case M_S_RSPLIT: {
    static const char *const names[] = {"sep", "maxsplit"};
    TS_TRY(bind(r, line, nm, a, names, 2, v));
    const jstr *sep = NULL;
    int64_t maxsplit = -1;
    if (v[0] && v[0]->kind != JV_NONE) {
      TS_TRY(need_str(r, line, nm, v[0]));
      sep = v[0]->u.s;
    }
    if (v[1]) TS_TRY(get_int(r, line, nm, v[1], &maxsplit));
    return do_split(r, line, s, sep, maxsplit, id == M_S_RSPLIT, out);
  }
  case M_S_REPLACE: {
    static const char *const names[] = {"old", "new", "count"};
    TS_TRY(bind(r, line, nm, a, names, 3, v));
    if (!v[0] || !v[1]) return jr_fail(r, line, "%s takes at least 2 arguments", nm);
    TS_TRY(need_str(r, line, nm, v[0]));
    TS_TRY(need_str(r, line, nm, v[1]));
    int64_t count = -1;
    if (v[2]) TS_TRY(get_int(r, line, nm, v[2], &count));
    return do_replace(r, line, s, v[0]->u.s, v[1]->u.s, count, out);
  }
  case M_S_FIND:
  case M_S_COUNT:
  case M_S_REMOVEPREFIX:
  case M_S_REMOVESUFFIX: {
    static const char *const names[] = {"sub"};
    TS_TRY(bind(r, line, nm, a, names, 1, v));
    if (!v[0]) return jr_fail(r, line, "%s takes exactly 1 argument", nm);
    TS_TRY(need_str(r, line, nm, v[0]));
    const jstr *sub = v[0]->u.s;
    if (id == M_S_FIND) {
      const char *hit = sub->len ? memmem(s->s, s->len, sub->s, sub->len) : s->s;
      *out = jv_int(hit ? (int64_t)ju_cplen(s->s, (size_t)(hit - s->s)) : -1);
    } else if (id == M_S_COUNT) {
      int64_t c = 0;
      if (!sub->len) c = (int64_t)ju_cplen(s->s, s->len) + 1;
      else
        for (const char *p = s->s; (p = memmem(p, s->len - (size_t)(p - s->s), sub->s, sub->len)); p += sub->len) c++;
      *out = jv_int(c);
    } else if (id == M_S_REMOVEPREFIX) {
      int has = sub->len <= s->len && !memcmp(s->s, sub->s, sub->len);
      return mkstr(r, line, s->s + (has ? sub->len : 0), s->len - (has ? sub->len : 0), out);
    } else {
      int has = sub->len <= s->len && !memcmp(s->s + s->len - sub->len, sub->s, sub->len);
      return mkstr(r, line, s->s, s->len - (has ? sub->len : 0), out);
    }
    return 0;
  }
  case M_S_JOIN: {
    if (a->npos != 1 || a->nkw) return jr_fail(r, line, "%s takes exactly one argument", nm);
    jlist *items;
    TS_TRY(jinja_iterate(r, line, a->pos[0], &items));
    jbuf b = {.limit = r->lim.max_output};
    for (size_t i = 0; i < items->n; i++) {
      if (items->v[i].kind != JV_STR) {
        jbuf_free(&b);
        return jr_fail(r, line, "sequence item %zu: expected str instance, %s found", i, jv_type_name(&items->v[i]));
      }
      if (i) jbuf_put(&b, s->s, s->len);
      jbuf_put(&b, items->v[i].u.s->s, items->v[i].u.s->len);
    }
    return buf_to_str(r, line, &b, out);
  }
  case M_S_SPLITLINES: {
    static const char *const names[] = {"keepends"};
    TS_TRY(bind(r, line, nm, a, names, 1, v));
    int keep = v[0] && jv_truthy(v[0]);
    jlist *l;
    TS_TRY(mklist(r, line, 0, &l));
    size_t st = 0, i = 0;
    while (i < s->len) {
      int32_t c = ju_decode(s->s, s->len, i);
      size_t nx = ju_next(s->s, s->len, i);
      int brk = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || (c >= 0x1C && c <= 0x1E) || c == 0x85 ||
                c == 0x2028 || c == 0x2029;
      if (brk) {
        size_t e = nx;
        if (c == '\r' && nx < s->len && s->s[nx] == '\n') e = nx + 1;
        jv piece;
        TS_TRY(mkstr(r, line, s->s + st, (keep ? e : i) - st, &piece));
        if (jlist_push(&r->arena, l, piece) < 0) return jr_oom(r, line);
        st = i = e;
      } else {
        i = nx;
      }
    }
    if (st < s->len) {
      jv piece;
      TS_TRY(mkstr(r, line, s->s + st, s->len - st, &piece));
      if (jlist_push(&r->arena, l, piece) < 0) return jr_oom(r, line);
    }
    *out = list_val(l, 0);
    return 0;
  }
  default: break;
  }
  if (a->npos || a->nkw) return jr_fail(r, line, "%s takes no arguments", nm);
  switch (id) {
  case M_S_LOWER: return case_map(r, line, s, utf8proc_tolower, 0, out);
  case M_S_UPPER: return case_map(r, line, s, utf8proc_toupper, 0, out);
  case M_S_CAPITALIZE: return case_map(r, line, s, NULL, 1, out);
  case M_S_TITLE: return case_map(r, line, s, NULL, 2, out);
  default: {
    /* is* predicates: true when non-empty and every code point qualifies (islower/isupper: some
     * cased character and none of the other case). */
    int all = s->len > 0, cased = 0, wrong_case = 0;
    for (size_t i = 0; i < s->len; i = ju_next(s->s, s->len, i)) {
      int32_t c = ju_decode(s->s, s->len, i);
      utf8proc_category_t cat = utf8proc_category(c);
      int alpha = cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO;
      int digit = cat == UTF8PROC_CATEGORY_ND;
      int ok = id == M_S_ISSPACE ? ju_isspace(c) : id == M_S_ISDIGIT ? digit : id == M_S_ISALPHA ? alpha : id == M_S_ISALNUM ? (alpha || digit) : 1;
      if (!ok) all = 0;
      if (cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LT) {
        cased = 1;
        if (id == M_S_ISLOWER) wrong_case = 1;
      } else if (cat == UTF8PROC_CATEGORY_LL) {
        cased = 1;
        if (id == M_S_ISUPPER) wrong_case = 1;
      }
    }
    if (id == M_S_ISLOWER || id == M_S_ISUPPER) *out = jv_bool(cased && !wrong_case);
    else *out = jv_bool(all);
    return 0;
  }
  }
}

int jinja_call_method(jrender *r, int line, const jfunc *f, const jargs *a, jv *out) {
  int id = f->id;
  if (id == M_UNSUPPORTED + 1000) { /* list.count */
    if (a->npos != 1 || a->nkw) return jr_fail(r, line, "list.count() takes exactly one argument");
    int64_t c = 0;
    for (size_t i = 0; i < f->self.u.l->n; i++) c += jv_equal(&f->self.u.l->v[i], &a->pos[0]);
    *out = jv_int(c);
    return 0;
  }
  if (id >= M_UNSUPPORTED) {
    const char *name = other_methods[id - M_UNSUPPORTED];
    return jr_fail(r, line, "unsupported method '%s' of %s", name, jv_type_name(&f->self));
  }
  if (id == M_CYCLE) {
    if (!a->npos || a->nkw) return jr_fail(r, line, "loop.cycle() needs at least one positional argument");
    jv *i0 = jdict_get_str(f->self.u.d, "index0", 6);
    *out = a->pos[(size_t)(i0 ? i0->u.i : 0) % a->npos];
    return 0;
  }
  if (id >= M_DICT_BASE) {
    const jdict *d = f->self.u.d;
    int m = id - M_DICT_BASE;
    if (m == M_D_GET) {
      if (a->nkw || a->npos < 1 || a->npos > 2) return jr_fail(r, line, "dict.get() takes 1 or 2 positional arguments");
      jv *v = jdict_get(d, a->pos[0]);
      *out = v ? *v : a->npos == 2 ? a->pos[1] : jv_none();
      return 0;
    }
    if (a->npos || a->nkw) return jr_fail(r, line, "dict.%s() takes no arguments", dict_method_names[m]);
    jlist *l;
    TS_TRY(mklist(r, line, d->n, &l));
    for (size_t i = 0; i < d->n; i++) {
      if (m == M_D_ITEMS) TS_TRY(pair(r, line, d->k[i], d->v[i], &l->v[i]));
      else l->v[i] = m == M_D_KEYS ? d->k[i] : d->v[i];
    }
    l->n = d->n;
    *out = list_val(l, 0);
    return 0;
  }
  return str_method(r, line, f->self.u.s, id, a, out);
}
