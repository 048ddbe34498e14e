/* Jinja evaluator: runs the AST over a render context with jinja2's scoping (a fresh scope per
 * loop iteration and macro call), Undefined semantics, Python operators and output limits. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template/jinja_internal.h"

enum { JR_OK = 0, JR_BREAK = 1, JR_CONTINUE = 2 };

/* Long operator or filter chains parse into deep trees; bound the recursion they cause. */
#define JR_MAX_EVAL_DEPTH 500

int jr_fail(jrender *r, int line, const char *fmt, ...) {
  char m[TS_ERR_MSG_MAX - 32];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(m, sizeof m, fmt, ap);
  va_end(ap);
  return ts_errorf(r->err, TS_EINVAL, "%s at line %d", m, line);
}

int jr_oom(jrender *r, int line) {
  return ts_errorf(r->err, TS_ENOMEM, "template render ran out of memory (limit %zu bytes) at line %d",
                   r->lim.max_memory, line);
}

static const char *jr_why(jrender *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static const char *jr_why(jrender *r, const char *fmt, ...) {
  char m[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(m, sizeof m, fmt, ap);
  va_end(ap);
  const jstr *s = jstr_new(&r->arena, m, strlen(m));
  return s ? s->s : NULL;
}

int jinja_undef_error(jrender *r, int line, const jv *v) {
  return jr_fail(r, line, "%s", v->u.why ? v->u.why : "value is undefined");
}

static int step(jrender *r, int line) {
  if (++r->steps > r->lim.max_steps)
    return jr_fail(r, line, "template render exceeded %llu steps", (unsigned long long)r->lim.max_steps);
  return 0;
}

/* ---- scopes ---- */

static jscope *scope_new(jrender *r, jscope *parent) {
  jscope *s = jarena_alloc(&r->arena, sizeof *s);
  if (s) s->parent = parent;
  return s;
}

static int scope_set(jrender *r, jscope *s, const char *name, size_t n, jv v) {
  for (size_t i = 0; i < s->n; i++)
    if (s->lens[i] == n && memcmp(s->names[i], name, n) == 0) {
      s->vals[i] = v;
      return 0;
    }
  if (s->n == s->cap) {
    size_t cap = s->cap ? s->cap * 2 : 8;
    const char **nn = jarena_alloc(&r->arena, cap * sizeof *nn);
    size_t *nl = jarena_alloc(&r->arena, cap * sizeof *nl);
    jv *nv = jarena_alloc(&r->arena, cap * sizeof *nv);
    if (!nn || !nl || !nv) return -1;
    if (s->n) {
      memcpy(nn, s->names, s->n * sizeof *nn);
      memcpy(nl, s->lens, s->n * sizeof *nl);
      memcpy(nv, s->vals, s->n * sizeof *nv);
    }
    s->names = nn;
    s->lens = nl;
    s->vals = nv;
    s->cap = cap;
  }
  s->names[s->n] = name;
  s->lens[s->n] = n;
  s->vals[s->n] = v;
  s->n++;
  return 0;
}

static int lookup(jrender *r, jscope *s, const char *name, size_t n, jv *out) {
  for (; s; s = s->parent)
    for (size_t i = s->n; i-- > 0;)
      if (s->lens[i] == n && memcmp(s->names[i], name, n) == 0) {
        *out = s->vals[i];
        return 1;
      }
  jv *v = jdict_get_str(r->ctx, name, n);
  if (v) {
    *out = *v;
    return 1;
  }
  int g = jinja_global_id(name, n);
  if (g >= 0) {
    jfunc *f = jarena_alloc(&r->arena, sizeof *f);
    if (!f) return -1;
    f->kind = JF_GLOBAL;
    f->id = g;
    out->kind = JV_FUNC;
    out->flags = 0;
    out->u.fn = f;
    return 1;
  }
  return 0;
}

/* Binds the names a frame owns but has not assigned yet to Undefined (see jinja_scope.c). */
static int bind_undef(jrender *r, jscope *s, const jnodes *names, int line) {
  for (size_t i = 0; i < names->n; i++) {
    const jnode *nm = names->v[i];
    jv u = jv_undef(jr_why(r, "'%.*s' is undefined", (int)(nm->nlen > 100 ? 100 : nm->nlen), nm->name));
    if (scope_set(r, s, nm->name, nm->nlen, u) < 0) return jr_oom(r, line);
  }
  return 0;
}

/* ---- attribute and item access ---- */

static int make_method(jrender *r, int line, jv self, int id, jv *out) {
  jfunc *f = jarena_alloc(&r->arena, sizeof *f);
  if (!f) return jr_oom(r, line);
  f->kind = JF_METHOD;
  f->id = id;
  f->self = self;
  out->kind = JV_FUNC;
  out->flags = 0;
  out->u.fn = f;
  return 0;
}

int jinja_getattr(jrender *r, int line, jv obj, const char *name, size_t n, jv *out) {
  if (obj.kind == JV_UNDEF) return jinja_undef_error(r, line, &obj);
  if (obj.kind == JV_NS || (obj.kind == JV_DICT && (obj.flags & JV_F_LOOP))) {
    jv *v = jdict_get_str(obj.u.d, name, n);
    if (v) {
      *out = *v;
      return 0;
    }
  }
  int m = jinja_method_id(&obj, name, n);
  if (m >= 0) return make_method(r, line, obj, m, out);
  if (obj.kind == JV_DICT && !(obj.flags & JV_F_LOOP)) {
    jv *v = jdict_get_str(obj.u.d, name, n);
    if (v) {
      *out = *v;
      return 0;
    }
  }
  *out = jv_undef(jr_why(r, "'%s object' has no attribute '%.*s'", jv_type_name(&obj), (int)(n > 100 ? 100 : n), name));
  return 0;
}

static int norm_index(int64_t i, size_t n, size_t *out) {
  if (i < 0) i += (int64_t)n;
  if (i < 0 || (uint64_t)i >= n) return 0;
  *out = (size_t)i;
  return 1;
}

int jinja_getitem(jrender *r, int line, jv obj, jv key, jv *out) {
  if (obj.kind == JV_UNDEF) return jinja_undef_error(r, line, &obj);
  if (obj.kind == JV_DICT && !(obj.flags & JV_F_LOOP)) {
    jv *v = jdict_get(obj.u.d, key);
    if (v) {
      *out = *v;
      return 0;
    }
  } else if ((obj.kind == JV_LIST || obj.kind == JV_STR) && (key.kind == JV_INT || key.kind == JV_BOOL)) {
    int64_t i = key.kind == JV_INT ? key.u.i : key.u.b;
    size_t k;
    if (obj.kind == JV_LIST) {
      if (norm_index(i, obj.u.l->n, &k)) {
        *out = obj.u.l->v[k];
        return 0;
      }
    } else {
      const jstr *s = obj.u.s;
      if (norm_index(i, ju_cplen(s->s, s->len), &k)) {
        size_t b = ju_offset(s->s, s->len, k);
        if (jv_str(&r->arena, s->s + b, ju_next(s->s, s->len, b) - b, out) < 0) return jr_oom(r, line);
        return 0;
      }
    }
    *out = jv_undef(jr_why(r, "'%s object' has no element %lld", jv_type_name(&obj), (long long)i));
    return 0;
  }
  if (key.kind == JV_STR) return jinja_getattr(r, line, obj, key.u.s->s, key.u.s->len, out);
  jbuf kb = {.limit = 200};
  jv_repr(&kb, &key);
  *out = jv_undef(jr_why(r, "'%s object' has no element %s", jv_type_name(&obj), kb.p ? kb.p : "?"));
  jbuf_free(&kb);
  return 0;
}

/* Slice bounds are None or integers (bools count); anything else is Python's TypeError. */
static int slice_bound(jrender *r, int line, const jv *v, int64_t *out, int *present) {
  *present = 0;
  if (!v || v->kind == JV_NONE) return 0;
  if (v->kind == JV_INT || v->kind == JV_BOOL) {
    *out = v->kind == JV_INT ? v->u.i : v->u.b;
    *present = 1;
    return 0;
  }
  return jr_fail(r, line, "slice indices must be integers or None, not %s", jv_type_name(v));
}

static int do_slice(jrender *r, int line, jv obj, const jv *a, const jv *b, const jv *c, jv *out) {
  if (obj.kind == JV_UNDEF) return jinja_undef_error(r, line, &obj);
  if (obj.kind == JV_DICT && !(obj.flags & JV_F_LOOP)) return jr_fail(r, line, "unhashable type: 'slice'");
  if (obj.kind != JV_LIST && obj.kind != JV_STR)
    return jr_fail(r, line, "'%s' object is not subscriptable", jv_type_name(&obj));
  int64_t start = 0, stop = 0, stp = 1;
  int hs, he, hp;
  TS_TRY(slice_bound(r, line, a, &start, &hs));
  TS_TRY(slice_bound(r, line, b, &stop, &he));
  TS_TRY(slice_bound(r, line, c, &stp, &hp));
  if (!hp) stp = 1;
  if (stp == 0) return jr_fail(r, line, "slice step cannot be zero");
  const jstr *s = obj.kind == JV_STR ? obj.u.s : NULL;
  int64_t n = s ? (int64_t)ju_cplen(s->s, s->len) : (int64_t)obj.u.l->n;
  /* Python's PySlice_AdjustIndices. */
  if (!hs) start = stp < 0 ? n - 1 : 0;
  else if (start < 0) start = start + n < 0 ? (stp < 0 ? -1 : 0) : start + n;
  else if (start >= n) start = stp < 0 ? n - 1 : n;
  if (!he) stop = stp < 0 ? -1 : n;
  else if (stop < 0) stop = stop + n < 0 ? (stp < 0 ? -1 : 0) : stop + n;
  else if (stop >= n) stop = stp < 0 ? n - 1 : n;
  int64_t cnt = 0;
  if (stp > 0 && start < stop) cnt = (stop - start - 1) / stp + 1;
  if (stp < 0 && stop < start) cnt = (start - stop - 1) / (-stp) + 1;
  if (!s) {
    jlist *l = jlist_new(&r->arena, (size_t)cnt);
    if (!l && cnt) return jr_oom(r, line);
    if (!l && !(l = jlist_new(&r->arena, 0))) return jr_oom(r, line);
    for (int64_t i = 0; i < cnt; i++) l->v[i] = obj.u.l->v[start + i * stp];
    l->n = (size_t)cnt;
    out->kind = JV_LIST;
    out->flags = obj.flags & JV_F_TUPLE;
    out->u.l = l;
    return 0;
  }
  /* Strings: offsets of every code point, then pick. */
  size_t *offs = malloc(((size_t)n + 1) * sizeof *offs);
  if (!offs) return jr_oom(r, line);
  size_t i = 0, k = 0;
  while (i < s->len) {
    offs[k++] = i;
    i = ju_next(s->s, s->len, i);
  }
  offs[k] = s->len;
  jbuf b2 = {.limit = r->lim.max_output};
  int rc = 0;
  for (int64_t j = 0; j < cnt && rc == 0; j++) {
    int64_t p = start + j * stp;
    rc = jbuf_put(&b2, s->s + offs[p], offs[p + 1] - offs[p]);
  }
  free(offs);
  if (rc == 0) rc = jv_str(&r->arena, b2.p ? b2.p : "", b2.len, out);
  jbuf_free(&b2);
  return rc < 0 ? jr_oom(r, line) : 0;
}

int jinja_iterate(jrender *r, int line, jv v, jlist **out) {
  switch (v.kind) {
  case JV_UNDEF:
    *out = jlist_new(&r->arena, 0);
    break;
  case JV_LIST:
    *out = v.u.l;
    return 0;
  case JV_DICT:
    if (v.flags & JV_F_LOOP) goto bad;
    *out = jlist_new(&r->arena, v.u.d->n);
    if (!*out) return jr_oom(r, line);
    for (size_t i = 0; i < v.u.d->n; i++) (*out)->v[i] = v.u.d->k[i];
    (*out)->n = v.u.d->n;
    return 0;
  case JV_STR: {
    const jstr *s = v.u.s;
    *out = jlist_new(&r->arena, ju_cplen(s->s, s->len));
    if (!*out) return jr_oom(r, line);
    for (size_t i = 0; i < s->len;) {
      size_t nx = ju_next(s->s, s->len, i);
      if (jv_str(&r->arena, s->s + i, nx - i, &(*out)->v[(*out)->n++]) < 0) return jr_oom(r, line);
      i = nx;
    }
    return 0;
  }
  default:
  bad:
    return jr_fail(r, line, "'%s' object is not iterable", jv_type_name(&v));
  }
  return *out ? 0 : jr_oom(r, line);
}

/* ---- operators ---- */

static int is_intlike(const jv *v) { return v->kind == JV_INT || v->kind == JV_BOOL; }
static int64_t ival(const jv *v) { return v->kind == JV_INT ? v->u.i : v->u.b; }

static int binop_type_error(jrender *r, int line, const char *op, const jv *a, const jv *b) {
  return jr_fail(r, line, "unsupported operand type(s) for %s: '%s' and '%s'", op, jv_type_name(a), jv_type_name(b));
}

static int repeat(jrender *r, int line, jv seq, int64_t times, jv *out) {
  if (times < 0) times = 0;
  if (seq.kind == JV_STR) {
    size_t len = seq.u.s->len;
    if (len && (uint64_t)times > r->lim.max_output / len) return jr_fail(r, line, "string repetition too large");
    jstr *s = jarena_alloc(&r->arena, sizeof(jstr) + len * (size_t)times + 1);
    if (!s) return jr_oom(r, line);
    for (int64_t i = 0; i < times; i++) memcpy(s->s + len * (size_t)i, seq.u.s->s, len);
    s->len = len * (size_t)times;
    out->kind = JV_STR;
    out->flags = 0;
    out->u.s = s;
    return 0;
  }
  size_t n = seq.u.l->n;
  if (n && (uint64_t)times > (r->lim.max_memory / sizeof(jv)) / n) return jr_fail(r, line, "list repetition too large");
  jlist *l = jlist_new(&r->arena, n * (size_t)times);
  if (!l) return jr_oom(r, line);
  for (int64_t i = 0; i < times; i++) memcpy(l->v + n * (size_t)i, seq.u.l->v, n * sizeof(jv));
  l->n = n * (size_t)times;
  out->kind = JV_LIST;
  out->flags = seq.flags & JV_F_TUPLE;
  out->u.l = l;
  return 0;
}

static double py_fmod(double a, double b) {
  double m = fmod(a, b);
  if (m != 0.0) {
    if ((b < 0) != (m < 0)) m += b;
  } else {
    m = copysign(0.0, b);
  }
  return m;
}

static double py_floordiv(double a, double b) {
  double m = fmod(a, b);
  double div = (a - m) / b;
  if (m != 0.0 && ((b < 0) != (m < 0))) div -= 1.0;
  if (div == 0.0) return copysign(0.0, a / b);
  double f = floor(div);
  if (div - f > 0.5) f += 1.0;
  return f;
}

/* Python's str % args for the plain conversions %s %r %d %i and %%; others are unsupported. */
static int percent_format(jrender *r, int line, const jstr *fmt, jv args, jv *out) {
  const jv *av = &args;
  size_t na = 1, used = 0;
  /* CPython skips the "not all arguments converted" check for anything subscriptable but a
   * tuple or str: dicts, lists and Undefined. */
  int mapping = (args.kind == JV_DICT && !(args.flags & JV_F_LOOP)) || (args.kind == JV_LIST && !(args.flags & JV_F_TUPLE)) ||
                args.kind == JV_UNDEF;
  if (args.kind == JV_LIST && (args.flags & JV_F_TUPLE)) {
    av = args.u.l->v;
    na = args.u.l->n;
  }
  jbuf b = {.limit = r->lim.max_output};
  int rc = 0;
  for (size_t i = 0; i < fmt->len && rc == 0; i++) {
    char c = fmt->s[i];
    if (c != '%') {
      jbuf_putc(&b, c);
      continue;
    }
    char t = i + 1 < fmt->len ? fmt->s[++i] : 0;
    if (t == '%') {
      jbuf_putc(&b, '%');
      continue;
    }
    if (t != 's' && t != 'r' && t != 'd' && t != 'i') {
      rc = t ? jr_fail(r, line, "unsupported: %%-format conversion '%c'", t) : jr_fail(r, line, "incomplete format");
      break;
    }
    if (used >= na) {
      rc = jr_fail(r, line, "not enough arguments for format string");
      break;
    }
    const jv *v = &av[used++];
    if (t == 's') jv_to_str(&b, v);
    else if (t == 'r') jv_repr(&b, v);
    else if (v->kind == JV_INT || v->kind == JV_BOOL) jbuf_printf(&b, "%lld", (long long)(v->kind == JV_INT ? v->u.i : v->u.b));
    else if (v->kind == JV_FLOAT && isfinite(v->u.f) && fabs(v->u.f) < 9.2e18) jbuf_printf(&b, "%lld", (long long)v->u.f);
    else rc = jr_fail(r, line, "%%%c format: a real number is required, not %s", t, jv_type_name(v));
  }
  if (rc == 0 && used < na && !mapping) rc = jr_fail(r, line, "not all arguments converted during string formatting");
  if (rc == 0 && b.over) rc = jr_fail(r, line, "string too long");
  if (rc == 0 && jv_str(&r->arena, b.p ? b.p : "", b.len, out) < 0) rc = jr_oom(r, line);
  jbuf_free(&b);
  return rc;
}

static int binary(jrender *r, int line, int op, jv a, jv b, jv *out) {
  static const char *names[] = {"+", "-", "*", "/", "//", "%", "**", "~"};
  if (op == JOP_CONCAT) {
    jbuf buf = {.limit = r->lim.max_output};
    int rc = jv_to_str(&buf, &a);
    if (rc == 0) rc = jv_to_str(&buf, &b);
    if (rc == 0) rc = jv_str(&r->arena, buf.p ? buf.p : "", buf.len, out);
    int over = buf.over;
    jbuf_free(&buf);
    if (rc < 0) return over ? jr_fail(r, line, "string too long") : jr_oom(r, line);
    return 0;
  }
  if (op == JOP_MOD && a.kind == JV_STR) return percent_format(r, line, a.u.s, b, out);
  if (a.kind == JV_UNDEF) return jinja_undef_error(r, line, &a);
  if (b.kind == JV_UNDEF) return jinja_undef_error(r, line, &b);
  const char *nm = names[op];
  if (jv_is_number(&a) && jv_is_number(&b)) {
    int ints = is_intlike(&a) && is_intlike(&b);
    int64_t x = ints ? ival(&a) : 0, y = ints ? ival(&b) : 0, z;
    double fx = jv_num(&a), fy = jv_num(&b);
    switch (op) {
    case JOP_ADD:
      if (!ints) { *out = jv_float(fx + fy); return 0; }
      if (__builtin_add_overflow(x, y, &z)) return jr_fail(r, line, "integer overflow");
      *out = jv_int(z);
      return 0;
    case JOP_SUB:
      if (!ints) { *out = jv_float(fx - fy); return 0; }
      if (__builtin_sub_overflow(x, y, &z)) return jr_fail(r, line, "integer overflow");
      *out = jv_int(z);
      return 0;
    case JOP_MUL:
      if (!ints) { *out = jv_float(fx * fy); return 0; }
      if (__builtin_mul_overflow(x, y, &z)) return jr_fail(r, line, "integer overflow");
      *out = jv_int(z);
      return 0;
    case JOP_DIV:
      if (fy == 0.0) return jr_fail(r, line, "division by zero");
      *out = jv_float(fx / fy);
      return 0;
    case JOP_FLOORDIV:
    case JOP_MOD:
      if (ints ? y == 0 : fy == 0.0) return jr_fail(r, line, op == JOP_MOD ? "modulo by zero" : "division by zero");
      if (ints) {
        if (x == INT64_MIN && y == -1) {
          if (op == JOP_MOD) { *out = jv_int(0); return 0; }
          return jr_fail(r, line, "integer overflow");
        }
        int64_t q = x / y, m = x % y;
        if (m != 0 && ((m < 0) != (y < 0))) {
          q -= 1;
          m += y;
        }
        *out = jv_int(op == JOP_MOD ? m : q);
        return 0;
      }
      *out = jv_float(op == JOP_MOD ? py_fmod(fx, fy) : py_floordiv(fx, fy));
      return 0;
    case JOP_POW:
      if (ints && y >= 0) {
        int64_t acc = 1, base = x;
        for (int64_t e = y; e > 0; e >>= 1) {
          if ((e & 1) && __builtin_mul_overflow(acc, base, &acc)) return jr_fail(r, line, "integer overflow");
          if (e > 1 && __builtin_mul_overflow(base, base, &base)) return jr_fail(r, line, "integer overflow");
        }
        *out = jv_int(acc);
        return 0;
      }
      if (fx == 0.0 && fy < 0) return jr_fail(r, line, "zero to a negative power");
      if (fx < 0 && fy != floor(fy)) return jr_fail(r, line, "unsupported: complex result of **");
      *out = jv_float(pow(fx, fy));
      return 0;
    }
  }
  if (op == JOP_ADD && a.kind == JV_STR && b.kind == JV_STR) {
    size_t n = a.u.s->len + b.u.s->len;
    if (n > r->lim.max_output) return jr_fail(r, line, "string too long");
    jstr *s = jarena_alloc(&r->arena, sizeof(jstr) + n + 1);
    if (!s) return jr_oom(r, line);
    memcpy(s->s, a.u.s->s, a.u.s->len);
    memcpy(s->s + a.u.s->len, b.u.s->s, b.u.s->len);
    s->len = n;
    out->kind = JV_STR;
    out->flags = 0;
    out->u.s = s;
    return 0;
  }
  if (op == JOP_ADD && a.kind == JV_LIST && b.kind == JV_LIST && (a.flags & JV_F_TUPLE) == (b.flags & JV_F_TUPLE)) {
    size_t n = a.u.l->n + b.u.l->n;
    jlist *l = jlist_new(&r->arena, n);
    if (!l && n) return jr_oom(r, line);
    if (!l && !(l = jlist_new(&r->arena, 0))) return jr_oom(r, line);
    if (a.u.l->n) memcpy(l->v, a.u.l->v, a.u.l->n * sizeof(jv));
    if (b.u.l->n) memcpy(l->v + a.u.l->n, b.u.l->v, b.u.l->n * sizeof(jv));
    l->n = n;
    out->kind = JV_LIST;
    out->flags = a.flags & JV_F_TUPLE;
    out->u.l = l;
    return 0;
  }
  if (op == JOP_MUL) {
    if ((a.kind == JV_STR || a.kind == JV_LIST) && is_intlike(&b)) return repeat(r, line, a, ival(&b), out);
    if ((b.kind == JV_STR || b.kind == JV_LIST) && is_intlike(&a)) return repeat(r, line, b, ival(&a), out);
  }
  return binop_type_error(r, line, nm, &a, &b);
}

static int contains(jrender *r, int line, jv needle, jv hay, int *out) {
  switch (hay.kind) {
  case JV_UNDEF: *out = 0; return 0;
  case JV_STR:
    if (needle.kind != JV_STR)
      return jr_fail(r, line, "'in <string>' requires string as left operand, not %s", jv_type_name(&needle));
    *out = needle.u.s->len == 0 || memmem(hay.u.s->s, hay.u.s->len, needle.u.s->s, needle.u.s->len) != NULL;
    return 0;
  case JV_LIST:
    *out = 0;
    for (size_t i = 0; i < hay.u.l->n && !*out; i++) *out = jv_equal(&hay.u.l->v[i], &needle);
    return 0;
  case JV_DICT:
    if (hay.flags & JV_F_LOOP) break;
    if ((needle.kind == JV_LIST && !(needle.flags & JV_F_TUPLE)) || needle.kind == JV_DICT || needle.kind == JV_NS)
      return jr_fail(r, line, "unhashable type: '%s'", jv_type_name(&needle));
    *out = jdict_get(hay.u.d, needle) != NULL;
    return 0;
  default: break;
  }
  return jr_fail(r, line, "argument of type '%s' is not iterable", jv_type_name(&hay));
}

static int compare(jrender *r, int line, int op, jv a, jv b, int *out) {
  switch (op) {
  case JOP_EQ: *out = jv_equal(&a, &b); return 0;
  case JOP_NE: *out = !jv_equal(&a, &b); return 0;
  case JOP_IN: return contains(r, line, a, b, out);
  case JOP_NOTIN: TS_TRY(contains(r, line, a, b, out)); *out = !*out; return 0;
  default: break;
  }
  if (a.kind == JV_UNDEF) return jinja_undef_error(r, line, &a);
  if (b.kind == JV_UNDEF) return jinja_undef_error(r, line, &b);
  int c = jv_compare(&a, &b);
  static const char *names[] = {"<", "<=", ">", ">="};
  if (c == -2)
    return jr_fail(r, line, "'%s' not supported between instances of '%s' and '%s'", names[op - JOP_LT],
                   jv_type_name(&a), jv_type_name(&b));
  if (jv_is_number(&a) && jv_is_number(&b) && (isnan(jv_num(&a)) || isnan(jv_num(&b)))) {
    *out = 0;
    return 0;
  }
  *out = op == JOP_LT ? c < 0 : op == JOP_LE ? c <= 0 : op == JOP_GT ? c > 0 : c >= 0;
  return 0;
}

/* ---- expressions ---- */

static int eval(jrender *r, jscope *sc, const jnode *n, jv *out);
static int exec_body(jrender *r, jscope *sc, const jnodes *body);

static int eval_args(jrender *r, jscope *sc, const jnode *n, jargs *a) {
  memset(a, 0, sizeof *a);
  size_t np = n->args.n, nk = n->kwvals.n;
  if (np && !(a->pos = jarena_alloc(&r->arena, np * sizeof(jv)))) return jr_oom(r, n->line);
  if (nk && !(a->kw = jarena_alloc(&r->arena, nk * sizeof(jv)))) return jr_oom(r, n->line);
  for (size_t i = 0; i < np; i++) TS_TRY(eval(r, sc, n->args.v[i], &a->pos[i]));
  for (size_t i = 0; i < nk; i++) TS_TRY(eval(r, sc, n->kwvals.v[i], &a->kw[i]));
  a->npos = np;
  a->nkw = nk;
  a->kwn = n->kwnames;
  a->kwl = n->kwlens;
  return 0;
}

/* Renders body into a string; with undef set it runs in a frame of its own. */
static int capture(jrender *r, jscope *sc, const jnodes *body, const jnodes *undef, int line, jv *out) {
  if (undef) {
    if (!(sc = scope_new(r, sc))) return jr_oom(r, line);
    TS_TRY(bind_undef(r, sc, undef, line));
  }
  jbuf buf = {.limit = r->lim.max_output};
  jbuf *saved = r->out;
  r->out = &buf;
  int rc = exec_body(r, sc, body);
  r->out = saved;
  if (rc >= 0 && jv_str(&r->arena, buf.p ? buf.p : "", buf.len, out) < 0) rc = jr_oom(r, line);
  jbuf_free(&buf);
  return rc < 0 ? rc : 0;
}

static int call_macro(jrender *r, int line, const jfunc *f, const jargs *a, jv *out) {
  const jnode *m = f->macro;
  if (a->npos > m->args.n)
    return jr_fail(r, line, "macro '%.*s' takes not more than %zu argument(s)", (int)m->nlen, m->name, m->args.n);
  if (r->depth >= r->lim.max_depth) return jr_fail(r, line, "macro calls nested deeper than %d", r->lim.max_depth);
  jscope *s = scope_new(r, f->closure);
  if (!s) return jr_oom(r, line);
  for (size_t k = 0; k < a->nkw; k++) {
    int found = 0;
    for (size_t i = 0; i < m->args.n; i++)
      if (m->args.v[i]->nlen == a->kwl[k] && !memcmp(m->args.v[i]->name, a->kwn[k], a->kwl[k])) found = 1;
    if (!found)
      return jr_fail(r, line, "macro '%.*s' takes no keyword argument '%.*s'", (int)m->nlen, m->name, (int)a->kwl[k],
                     a->kwn[k]);
  }
  r->depth++;
  int rc = bind_undef(r, s, &m->undef, line);
  for (size_t i = 0; i < m->args.n && rc == 0; i++) {
    const jnode *p = m->args.v[i];
    jv v = jv_undef(jr_why(r, "parameter '%.*s' was not provided", (int)p->nlen, p->name));
    int set = 0;
    if (i < a->npos) {
      v = a->pos[i];
      set = 1;
    }
    for (size_t k = 0; k < a->nkw; k++)
      if (p->nlen == a->kwl[k] && !memcmp(p->name, a->kwn[k], a->kwl[k])) {
        if (set) {
          rc = jr_fail(r, line, "macro '%.*s' got multiple values for argument '%.*s'", (int)m->nlen, m->name,
                       (int)p->nlen, p->name);
          break;
        }
        v = a->kw[k];
        set = 1;
      }
    if (rc == 0 && !set && m->kwvals.v[i]) rc = eval(r, s, m->kwvals.v[i], &v);
    if (rc == 0 && scope_set(r, s, p->name, p->nlen, v) < 0) rc = jr_oom(r, line);
  }
  if (rc == 0) rc = capture(r, s, &m->body, NULL, line, out);
  r->depth--;
  return rc;
}

static int eval_call(jrender *r, jscope *sc, const jnode *n, jv *out) {
  jv fn;
  TS_TRY(eval(r, sc, n->a, &fn));
  if (fn.kind == JV_UNDEF) return jinja_undef_error(r, n->line, &fn);
  if (fn.kind != JV_FUNC) return jr_fail(r, n->line, "'%s' object is not callable", jv_type_name(&fn));
  jargs a;
  TS_TRY(eval_args(r, sc, n, &a));
  switch (fn.u.fn->kind) {
  case JF_GLOBAL: return jinja_call_global(r, n->line, fn.u.fn->id, &a, out);
  case JF_METHOD: return jinja_call_method(r, n->line, fn.u.fn, &a, out);
  default: return call_macro(r, n->line, fn.u.fn, &a, out);
  }
}

static int eval_filter(jrender *r, jscope *sc, const jnode *n, const jv *operand, jv *out) {
  jv in;
  if (n->a) TS_TRY(eval(r, sc, n->a, &in));
  else in = *operand;
  jargs a;
  TS_TRY(eval_args(r, sc, n, &a));
  return jinja_apply_filter(r, n->line, n->id, in, &a, out);
}

/* A filter block's chain: the innermost filter (a == NULL) takes the captured text. */
static int eval_filter_chain(jrender *r, jscope *sc, const jnode *n, jv text, jv *out) {
  jv in = text;
  if (n->a) {
    if (r->edepth >= JR_MAX_EVAL_DEPTH) return jr_fail(r, n->line, "filter chain too long");
    r->edepth++;
    int rc = eval_filter_chain(r, sc, n->a, text, &in);
    r->edepth--;
    TS_TRY(rc);
  }
  jargs a;
  TS_TRY(eval_args(r, sc, n, &a));
  return jinja_apply_filter(r, n->line, n->id, in, &a, out);
}

static int eval_node(jrender *r, jscope *sc, const jnode *n, jv *out);


static int eval(jrender *r, jscope *sc, const jnode *n, jv *out) {
  TS_TRY(step(r, n->line));
  if (r->edepth >= JR_MAX_EVAL_DEPTH) return jr_fail(r, n->line, "expression nested too deeply");
  r->edepth++;
  int rc = eval_node(r, sc, n, out);
  r->edepth--;
  return rc;
}

static int eval_node(jrender *r, jscope *sc, const jnode *n, jv *out) {
  switch (n->kind) {
  case JN_LITERAL: *out = n->lit; return 0;
  case JN_NAME: {
    int f = lookup(r, sc, n->name, n->nlen, out);
    if (f < 0) return jr_oom(r, n->line);
    if (!f) *out = jv_undef(jr_why(r, "'%.*s' is undefined", (int)(n->nlen > 100 ? 100 : n->nlen), n->name));
    return 0;
  }
  case JN_LIST:
  case JN_TUPLE: {
    jlist *l = jlist_new(&r->arena, n->args.n);
    if (!l) return jr_oom(r, n->line);
    for (size_t i = 0; i < n->args.n; i++) TS_TRY(eval(r, sc, n->args.v[i], &l->v[i]));
    l->n = n->args.n;
    out->kind = JV_LIST;
    out->flags = n->kind == JN_TUPLE ? JV_F_TUPLE : 0;
    out->u.l = l;
    return 0;
  }
  case JN_DICT: {
    jdict *d = jdict_new(&r->arena, n->args.n);
    if (!d) return jr_oom(r, n->line);
    for (size_t i = 0; i < n->args.n; i++) {
      jv k, v;
      TS_TRY(eval(r, sc, n->args.v[i], &k));
      TS_TRY(eval(r, sc, n->kwvals.v[i], &v));
      if (k.kind == JV_LIST && !(k.flags & JV_F_TUPLE)) return jr_fail(r, n->line, "unhashable type: 'list'");
      if (k.kind == JV_DICT || k.kind == JV_NS) return jr_fail(r, n->line, "unhashable type: '%s'", jv_type_name(&k));
      if (k.kind == JV_UNDEF) return jinja_undef_error(r, n->line, &k);
      if (jdict_set(&r->arena, d, k, v) < 0) return jr_oom(r, n->line);
    }
    out->kind = JV_DICT;
    out->flags = 0;
    out->u.d = d;
    return 0;
  }
  case JN_GETATTR: {
    jv obj;
    TS_TRY(eval(r, sc, n->a, &obj));
    return jinja_getattr(r, n->line, obj, n->name, n->nlen, out);
  }
  case JN_GETITEM: {
    jv obj;
    TS_TRY(eval(r, sc, n->a, &obj));
    if (n->b->kind == JN_SLICE) {
      jv parts[3];
      const jnode *p[3] = {n->b->a, n->b->b, n->b->c};
      for (int i = 0; i < 3; i++)
        if (p[i]) TS_TRY(eval(r, sc, p[i], &parts[i]));
      return do_slice(r, n->line, obj, p[0] ? &parts[0] : NULL, p[1] ? &parts[1] : NULL, p[2] ? &parts[2] : NULL, out);
    }
    jv key;
    TS_TRY(eval(r, sc, n->b, &key));
    return jinja_getitem(r, n->line, obj, key, out);
  }
  case JN_CALL: return eval_call(r, sc, n, out);
  case JN_FILTER: return eval_filter(r, sc, n, NULL, out);
  case JN_TEST: {
    jv in;
    TS_TRY(eval(r, sc, n->a, &in));
    jargs a;
    TS_TRY(eval_args(r, sc, n, &a));
    int res;
    TS_TRY(jinja_apply_test(r, n->line, n->id, in, &a, &res));
    *out = jv_bool(n->op ? !res : res);
    return 0;
  }
  case JN_NEG:
  case JN_POS: {
    jv v;
    TS_TRY(eval(r, sc, n->a, &v));
    if (v.kind == JV_UNDEF) return jinja_undef_error(r, n->line, &v);
    if (v.kind == JV_FLOAT) *out = jv_float(n->kind == JN_NEG ? -v.u.f : v.u.f);
    else if (is_intlike(&v)) {
      int64_t i = ival(&v);
      if (n->kind == JN_NEG && i == INT64_MIN) return jr_fail(r, n->line, "integer overflow");
      *out = jv_int(n->kind == JN_NEG ? -i : i);
    } else {
      return jr_fail(r, n->line, "bad operand type for unary %c: '%s'", n->kind == JN_NEG ? '-' : '+', jv_type_name(&v));
    }
    return 0;
  }
  case JN_NOT: {
    jv v;
    TS_TRY(eval(r, sc, n->a, &v));
    *out = jv_bool(!jv_truthy(&v));
    return 0;
  }
  case JN_AND:
  case JN_OR: {
    TS_TRY(eval(r, sc, n->a, out));
    int t = jv_truthy(out);
    if ((n->kind == JN_AND) ? !t : t) return 0;
    return eval(r, sc, n->b, out);
  }
  case JN_COND: {
    jv c;
    TS_TRY(eval(r, sc, n->a, &c));
    if (jv_truthy(&c)) return eval(r, sc, n->b, out);
    if (n->c) return eval(r, sc, n->c, out);
    *out = jv_undef("the inline if-expression evaluated to false and no else section was defined");
    return 0;
  }
  case JN_BINARY: {
    jv a, b;
    TS_TRY(eval(r, sc, n->a, &a));
    TS_TRY(eval(r, sc, n->b, &b));
    return binary(r, n->line, n->op, a, b, out);
  }
  case JN_COMPARE: {
    jv left;
    TS_TRY(eval(r, sc, n->a, &left));
    for (size_t i = 0; i < n->args.n; i++) {
      jv right;
      int res;
      TS_TRY(eval(r, sc, n->args.v[i], &right));
      TS_TRY(compare(r, n->line, n->ops[i], left, right, &res));
      if (!res) {
        *out = jv_bool(0);
        return 0;
      }
      left = right;
    }
    *out = jv_bool(1);
    return 0;
  }
  default: return jr_fail(r, n->line, "internal error: statement used as expression");
  }
}

/* ---- statements ---- */

static int assign(jrender *r, jscope *sc, const jnode *target, jv v, int line) {
  if (target->kind == JN_NAME) {
    if (scope_set(r, sc, target->name, target->nlen, v) < 0) return jr_oom(r, line);
    return 0;
  }
  if (target->kind == JN_GETATTR) {
    jv ns;
    int f = lookup(r, sc, target->a->name, target->a->nlen, &ns);
    if (f < 0) return jr_oom(r, line);
    if (!f || ns.kind != JV_NS) return jr_fail(r, line, "cannot assign attribute on non-namespace object");
    jv k;
    if (jv_str(&r->arena, target->name, target->nlen, &k) < 0 || jdict_set(&r->arena, ns.u.d, k, v) < 0)
      return jr_oom(r, line);
    return 0;
  }
  /* Tuple unpacking. */
  jlist *items;
  if (v.kind == JV_UNDEF) return jinja_undef_error(r, line, &v);
  TS_TRY(jinja_iterate(r, line, v, &items));
  if (items->n != target->args.n)
    return jr_fail(r, line, items->n > target->args.n ? "too many values to unpack (expected %zu)"
                                                      : "not enough values to unpack (expected %zu)",
                   target->args.n);
  for (size_t i = 0; i < items->n; i++) TS_TRY(assign(r, sc, target->args.v[i], items->v[i], line));
  return 0;
}

static int loop_set(jrender *r, jdict *d, const char *k, jv v) {
  jv key;
  if (jv_str(&r->arena, k, strlen(k), &key) < 0) return -1;
  return jdict_set(&r->arena, d, key, v);
}

static int exec_for(jrender *r, jscope *sc, const jnode *n) {
  jv seqv;
  TS_TRY(eval(r, sc, n->b, &seqv));
  jlist *items;
  TS_TRY(jinja_iterate(r, n->line, seqv, &items));
  if (n->c) { /* "for x in y if cond": filter first, so loop.* count only kept items */
    jlist *kept = jlist_new(&r->arena, items->n);
    if (!kept) return jr_oom(r, n->line);
    for (size_t i = 0; i < items->n; i++) {
      TS_TRY(step(r, n->line));
      jscope *t = scope_new(r, sc);
      if (!t) return jr_oom(r, n->line);
      TS_TRY(assign(r, t, n->a, items->v[i], n->line));
      jv c;
      TS_TRY(eval(r, t, n->c, &c));
      if (jv_truthy(&c)) kept->v[kept->n++] = items->v[i];
    }
    items = kept;
  }
  size_t len = items->n;
  for (size_t i = 0; i < len; i++) {
    TS_TRY(step(r, n->line));
    jscope *it = scope_new(r, sc);
    jdict *loop = jdict_new(&r->arena, 12);
    if (!it || !loop) return jr_oom(r, n->line);
    int rc = 0;
    rc |= loop_set(r, loop, "index", jv_int((int64_t)i + 1));
    rc |= loop_set(r, loop, "index0", jv_int((int64_t)i));
    rc |= loop_set(r, loop, "revindex", jv_int((int64_t)(len - i)));
    rc |= loop_set(r, loop, "revindex0", jv_int((int64_t)(len - i - 1)));
    rc |= loop_set(r, loop, "first", jv_bool(i == 0));
    rc |= loop_set(r, loop, "last", jv_bool(i + 1 == len));
    rc |= loop_set(r, loop, "length", jv_int((int64_t)len));
    rc |= loop_set(r, loop, "depth", jv_int(1));
    rc |= loop_set(r, loop, "depth0", jv_int(0));
    if (i > 0) rc |= loop_set(r, loop, "previtem", items->v[i - 1]);
    if (i + 1 < len) rc |= loop_set(r, loop, "nextitem", items->v[i + 1]);
    if (rc) return jr_oom(r, n->line);
    jv lv = {.kind = JV_DICT, .flags = JV_F_LOOP};
    lv.u.d = loop;
    TS_TRY(bind_undef(r, it, &n->undef, n->line));
    if (scope_set(r, it, "loop", 4, lv) < 0) return jr_oom(r, n->line);
    TS_TRY(assign(r, it, n->a, items->v[i], n->line));
    int st = exec_body(r, it, &n->body);
    if (st < 0) return st;
    if (st == JR_BREAK) break;
  }
  if (len == 0 && n->orelse.n) {
    jscope *es = scope_new(r, sc);
    if (!es) return jr_oom(r, n->line);
    TS_TRY(bind_undef(r, es, &n->undef2, n->line));
    int st = exec_body(r, es, &n->orelse);
    return st < 0 ? st : 0;
  }
  return 0;
}

static int emit(jrender *r, int line, const jv *v) {
  if (jv_to_str(r->out, v) < 0) {
    if (r->out->limit && r->out->len + 1 > r->out->limit / 2)
      return jr_fail(r, line, "rendered output exceeds the limit of %zu bytes", r->lim.max_output);
    return jr_fail(r, line, "rendered output exceeds the limit of %zu bytes or memory ran out", r->lim.max_output);
  }
  return 0;
}

static int exec_stmt(jrender *r, jscope *sc, const jnode *n) {
  TS_TRY(step(r, n->line));
  switch (n->kind) {
  case JN_TEXT: return emit(r, n->line, &n->lit);
  case JN_OUTPUT: {
    jv v;
    TS_TRY(eval(r, sc, n->a, &v));
    return emit(r, n->line, &v);
  }
  case JN_IF: {
    jv c;
    TS_TRY(eval(r, sc, n->a, &c));
    return exec_body(r, sc, jv_truthy(&c) ? &n->body : &n->orelse);
  }
  case JN_FOR: return exec_for(r, sc, n);
  case JN_SET: {
    jv v;
    TS_TRY(eval(r, sc, n->b, &v));
    return assign(r, sc, n->a, v, n->line);
  }
  case JN_SET_BLOCK: {
    jv v;
    TS_TRY(capture(r, sc, &n->body, &n->undef, n->line, &v));
    return assign(r, sc, n->a, v, n->line);
  }
  case JN_MACRO: {
    jfunc *f = jarena_alloc(&r->arena, sizeof *f);
    if (!f) return jr_oom(r, n->line);
    f->kind = JF_MACRO;
    f->macro = n;
    f->closure = sc;
    jv v = {.kind = JV_FUNC};
    v.u.fn = f;
    if (scope_set(r, sc, n->name, n->nlen, v) < 0) return jr_oom(r, n->line);
    return 0;
  }
  case JN_BREAK: return JR_BREAK;
  case JN_CONTINUE: return JR_CONTINUE;
  case JN_FILTER_BLOCK: {
    jv text, v;
    TS_TRY(capture(r, sc, &n->body, &n->undef, n->line, &text));
    TS_TRY(eval_filter_chain(r, sc, n->a, text, &v));
    return emit(r, n->line, &v);
  }
  case JN_SCOPE: return exec_body(r, sc, &n->body);
  default: return jr_fail(r, n->line, "internal error: expression used as statement");
  }
}

static int exec_body(jrender *r, jscope *sc, const jnodes *body) {
  for (size_t i = 0; i < body->n; i++) {
    int st = exec_stmt(r, sc, body->v[i]);
    if (st != JR_OK) return st;
  }
  return JR_OK;
}

/* ---- entry points ---- */

int jinja_parse(jinja_template **out, const char *src, size_t len, ts_err *err) {
  *out = NULL;
  jinja_template *t = calloc(1, sizeof *t);
  if (!t) return ts_errorf(err, TS_ENOMEM, "out of memory");
  t->arena.limit = 256u << 20;
  jtoks toks = {0};
  int rc = jinja_lex(&t->arena, src, len, &toks, err);
  if (rc == 0) rc = jinja_parse_tokens(&t->arena, &toks, &t->body, err);
  if (rc == 0) rc = jinja_analyze_scopes(t, err);
  free(toks.v);
  if (rc < 0) {
    jinja_free(t);
    return rc;
  }
  *out = t;
  return 0;
}

void jinja_free(jinja_template *t) {
  if (!t) return;
  jarena_free(&t->arena);
  free(t);
}

int jinja_render_limited(const jinja_template *t, const json_t *ctx, const jinja_limits *lim, char **out,
                         size_t *len, ts_err *err) {
  *out = NULL;
  if (len) *len = 0;
  if (ctx && !json_is_object(ctx)) return ts_errorf(err, TS_EINVAL, "template context must be a JSON object");
  jrender r = {.err = err, .lim = *lim};
  r.arena.limit = lim->max_memory;
  jbuf buf = {.limit = lim->max_output};
  r.out = &buf;
  int rc = 0;
  jv c = {.kind = JV_DICT};
  if (ctx) {
    int jr = jv_from_json(&r.arena, ctx, &c, 0);
    if (jr == -2) rc = ts_errorf(err, TS_EINVAL, "template context nested too deeply");
    else if (jr < 0) rc = ts_errorf(err, TS_ENOMEM, "out of memory converting the template context");
    r.ctx = c.u.d;
  } else if (!(r.ctx = jdict_new(&r.arena, 0))) {
    rc = ts_errorf(err, TS_ENOMEM, "out of memory");
  }
  if (rc == 0 && !(r.root = scope_new(&r, NULL))) rc = ts_errorf(err, TS_ENOMEM, "out of memory");
  if (rc == 0) rc = bind_undef(&r, r.root, &t->undef, 1);
  if (rc == 0) rc = exec_body(&r, r.root, &t->body);
  jarena_free(&r.arena);
  if (rc < 0) {
    jbuf_free(&buf);
    return rc;
  }
  if (!buf.p && jbuf_put(&buf, "", 0) < 0) return ts_errorf(err, TS_ENOMEM, "out of memory");
  *out = buf.p;
  if (len) *len = buf.len;
  return 0;
}

int jinja_render(const jinja_template *t, const json_t *ctx, char **out, size_t *len, ts_err *err) {
  jinja_limits lim = {
      .max_output = 64u << 20, .max_memory = 1024u << 20, .max_steps = 100000000, .max_depth = 64};
  return jinja_render_limited(t, ctx, &lim, out, len, err);
}
