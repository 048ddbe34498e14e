/* Jinja filters that reorder or reshape sequences and text: sort, dictsort, unique (with
 * jinja2's case-insensitive default) and indent. */
#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "template/jinja_internal.h"

/* Python str.lower() (simple case mapping) as a new string value. */
static int lower_str(jrender *r, int line, const jstr *s, jv *out) {
  jbuf b = {.limit = r->lim.max_output};
  for (size_t i = 0; i < s->len; i = ju_next(s->s, s->len, i)) {
    utf8proc_uint8_t enc[4];
    utf8proc_ssize_t el = utf8proc_encode_char(utf8proc_tolower(ju_decode(s->s, s->len, i)), enc);
    jbuf_put(&b, (const char *)enc, (size_t)el);
  }
  int rc = b.over ? -1 : jv_str(&r->arena, b.p ? b.p : "", b.len, out);
  jbuf_free(&b);
  return rc < 0 ? jr_oom(r, line) : 0;
}

/* The sort key of an item: optional attribute, then lower-cased when case-insensitive. */
static int sort_key(jrender *r, int line, jv item, const jstr *attr, int case_sensitive, jv *key) {
  *key = item;
  if (attr) TS_TRY(jinja_attr_get(r, line, item, attr, key));
  if (!case_sensitive && key->kind == JV_STR) TS_TRY(lower_str(r, line, key->u.s, key));
  return 0;
}

/* Stable merge sort of idx[0..n) by keys; reverse keeps equal keys in input order, as Python's
 * sorted(reverse=True) does. */
static int merge_sort(jrender *r, int line, const jv *keys, size_t *idx, size_t *tmp, size_t n, int reverse) {
  if (n < 2) return 0;
  size_t h = n / 2;
  TS_TRY(merge_sort(r, line, keys, idx, tmp, h, reverse));
  TS_TRY(merge_sort(r, line, keys, idx + h, tmp, n - h, reverse));
  size_t i = 0, j = h, k = 0;
  while (i < h && j < n) {
    const jv *a = &keys[idx[i]], *b = &keys[idx[j]];
    int c = reverse ? jv_compare(a, b) : jv_compare(b, a); /* take from the right only when strictly first */
    if (c == -2)
      return jr_fail(r, line, "'<' not supported between instances of '%s' and '%s'", jv_type_name(a), jv_type_name(b));
    tmp[k++] = c < 0 ? idx[j++] : idx[i++];
  }
  while (i < h) tmp[k++] = idx[i++];
  while (j < n) tmp[k++] = idx[j++];
  memcpy(idx, tmp, n * sizeof *idx);
  return 0;
}

static int sorted_list(jrender *r, int line, jlist *items, const jv *keys, int reverse, jv *out) {
  size_t n = items->n;
  size_t *idx = malloc((n + 1) * sizeof *idx), *tmp = malloc((n + 1) * sizeof *tmp);
  jlist *l = jlist_new(&r->arena, n);
  int rc = (!idx || !tmp || (!l && n)) ? jr_oom(r, line) : 0;
  if (rc == 0 && !l && !(l = jlist_new(&r->arena, 0))) rc = jr_oom(r, line);
  if (rc == 0) {
    for (size_t i = 0; i < n; i++) idx[i] = i;
    rc = merge_sort(r, line, keys, idx, tmp, n, reverse);
  }
  if (rc == 0) {
    for (size_t i = 0; i < n; i++) l->v[i] = items->v[idx[i]];
    l->n = n;
    out->kind = JV_LIST;
    out->flags = 0;
    out->u.l = l;
  }
  free(idx);
  free(tmp);
  return rc;
}

static int attr_arg(jrender *r, int line, const jv *v, jv *tmp, const jstr **out) {
  *out = NULL;
  if (!v || v->kind == JV_NONE) return 0;
  if (v->kind == JV_INT) { /* an index, as jinja2 allows */
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%lld", (long long)v->u.i);
    if (jv_str(&r->arena, buf, (size_t)n, tmp) < 0) return jr_oom(r, line);
    *out = tmp->u.s;
    return 0;
  }
  if (v->kind != JV_STR) return jr_fail(r, line, "attribute must be a string, not %s", jv_type_name(v));
  if (memchr(v->u.s->s, ',', v->u.s->len)) return jr_fail(r, line, "unsupported: several sort attributes");
  *out = v->u.s;
  return 0;
}

/* Python str.splitlines(): the end of the line at i (exclusive) and where the next one starts. */
static size_t line_end(const char *s, size_t n, size_t i, size_t *next) {
  while (i < n) {
    int32_t c = ju_decode(s, n, i);
    size_t nx = ju_next(s, n, i);
    if (c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || (c >= 0x1C && c <= 0x1E) || c == 0x85 || c == 0x2028 ||
        c == 0x2029) {
      *next = (c == '\r' && nx < n && s[nx] == '\n') ? nx + 1 : nx;
      return i;
    }
    i = nx;
  }
  *next = n;
  return n;
}

static int do_indent(jrender *r, int line, jv in, const jargs *a, jv *out) {
  static const char *const names[] = {"width", "first", "blank"};
  const jv *s[3];
  TS_TRY(jinja_bind_args(r, line, "filter 'indent'", a, names, 3, s));
  if (in.kind == JV_UNDEF) return jinja_undef_error(r, line, &in);
  if (in.kind != JV_STR) return jr_fail(r, line, "filter 'indent' needs a string, not %s", jv_type_name(&in));
  jbuf ind = {.limit = 4096};
  if (!s[0]) jbuf_put(&ind, "    ", 4);
  else if (s[0]->kind == JV_STR) jbuf_put(&ind, s[0]->u.s->s, s[0]->u.s->len);
  else if (s[0]->kind == JV_INT || s[0]->kind == JV_BOOL) {
    int64_t w = s[0]->kind == JV_INT ? s[0]->u.i : s[0]->u.b;
    for (int64_t i = 0; i < w && !ind.over; i++) jbuf_putc(&ind, ' ');
  } else {
    return jr_fail(r, line, "filter 'indent' width must be an integer or string");
  }
  if (ind.over) {
    jbuf_free(&ind);
    return jr_fail(r, line, "indent too wide");
  }
  int first = s[1] && jv_truthy(s[1]), blank = s[2] && jv_truthy(s[2]);
  /* Like jinja2: the text plus a newline, split into lines, joined back with indentation. */
  jbuf src = {.limit = r->lim.max_output};
  jbuf_put(&src, in.u.s->s, in.u.s->len);
  jbuf_putc(&src, '\n');
  const char *p = src.p;
  size_t n = src.over ? 0 : src.len;
  jbuf b = {.limit = r->lim.max_output};
  if (first) jbuf_put(&b, ind.p ? ind.p : "", ind.len);
  size_t i = 0, k = 0, next;
  while (i < n) {
    size_t e = line_end(p, n, i, &next);
    if (k > 0) {
      jbuf_putc(&b, '\n');
      if (blank || e > i) jbuf_put(&b, ind.p ? ind.p : "", ind.len);
    }
    jbuf_put(&b, p + i, e - i);
    k++;
    i = next;
  }
  if (src.over) b.over = 1;
  jbuf_free(&src);
  jbuf_free(&ind);
  int rc = b.over ? -1 : jv_str(&r->arena, b.p ? b.p : "", b.len, out);
  jbuf_free(&b);
  return rc < 0 ? jr_fail(r, line, "string result too long") : 0;
}

int jinja_filter_sorting(jrender *r, int line, int which, jv in, const jargs *a, jv *out) {
  if (which == 3) return do_indent(r, line, in, a, out);
  const jv *s[3];
  jv tmp;
  const jstr *attr = NULL;
  int case_sensitive = 0, reverse = 0;
  jlist *items;
  if (which == 0) {
    static const char *const names[] = {"reverse", "case_sensitive", "attribute"};
    TS_TRY(jinja_bind_args(r, line, "filter 'sort'", a, names, 3, s));
    reverse = s[0] && jv_truthy(s[0]);
    case_sensitive = s[1] && jv_truthy(s[1]);
    TS_TRY(attr_arg(r, line, s[2], &tmp, &attr));
    TS_TRY(jinja_iterate(r, line, in, &items));
  } else if (which == 1) {
    static const char *const names[] = {"case_sensitive", "by", "reverse"};
    TS_TRY(jinja_bind_args(r, line, "filter 'dictsort'", a, names, 3, s));
    case_sensitive = s[0] && jv_truthy(s[0]);
    reverse = s[2] && jv_truthy(s[2]);
    int by_value = 0;
    if (s[1]) {
      if (s[1]->kind == JV_STR && s[1]->u.s->len == 5 && !memcmp(s[1]->u.s->s, "value", 5)) by_value = 1;
      else if (!(s[1]->kind == JV_STR && s[1]->u.s->len == 3 && !memcmp(s[1]->u.s->s, "key", 3)))
        return jr_fail(r, line, "You can only sort by either \"key\" or \"value\"");
    }
    if (in.kind != JV_DICT || (in.flags & JV_F_LOOP))
      return jr_fail(r, line, "filter 'dictsort' needs a mapping, not %s", jv_type_name(&in));
    if (!(items = jlist_new(&r->arena, in.u.d->n))) return jr_oom(r, line);
    jv *keys = jarena_alloc(&r->arena, (in.u.d->n + 1) * sizeof *keys);
    if (!keys) return jr_oom(r, line);
    for (size_t i = 0; i < in.u.d->n; i++) {
      jlist *p = jlist_new(&r->arena, 2);
      if (!p) return jr_oom(r, line);
      p->v[0] = in.u.d->k[i];
      p->v[1] = in.u.d->v[i];
      p->n = 2;
      items->v[i].kind = JV_LIST;
      items->v[i].flags = JV_F_TUPLE;
      items->v[i].u.l = p;
      TS_TRY(sort_key(r, line, by_value ? p->v[1] : p->v[0], NULL, case_sensitive, &keys[i]));
    }
    items->n = in.u.d->n;
    return sorted_list(r, line, items, keys, reverse, out);
  } else {
    static const char *const names[] = {"case_sensitive", "attribute"};
    TS_TRY(jinja_bind_args(r, line, "filter 'unique'", a, names, 2, s));
    case_sensitive = s[0] && jv_truthy(s[0]);
    TS_TRY(attr_arg(r, line, s[1], &tmp, &attr));
    TS_TRY(jinja_iterate(r, line, in, &items));
  }
  jv *keys = jarena_alloc(&r->arena, (items->n + 1) * sizeof *keys);
  if (!keys) return jr_oom(r, line);
  for (size_t i = 0; i < items->n; i++) {
    TS_TRY(sort_key(r, line, items->v[i], attr, case_sensitive, &keys[i]));
    if (which == 2 && ((keys[i].kind == JV_LIST && !(keys[i].flags & JV_F_TUPLE)) || keys[i].kind == JV_DICT))
      return jr_fail(r, line, "unhashable type: '%s'", jv_type_name(&keys[i]));
  }
  if (which == 0) return sorted_list(r, line, items, keys, reverse, out);
  /* unique: first occurrence of each key, in order (quadratic, so it counts against the steps). */
  jlist *l = jlist_new(&r->arena, items->n);
  size_t *kept = jarena_alloc(&r->arena, (items->n + 1) * sizeof *kept);
  if (!l || !kept) return jr_oom(r, line);
  for (size_t i = 0; i < items->n; i++) {
    r->steps += l->n + 1;
    if (r->steps > r->lim.max_steps)
      return jr_fail(r, line, "template render exceeded %llu steps", (unsigned long long)r->lim.max_steps);
    int seen = 0;
    for (size_t j = 0; j < l->n && !seen; j++) seen = jv_equal(&keys[kept[j]], &keys[i]);
    if (!seen) {
      kept[l->n] = i;
      l->v[l->n++] = items->v[i];
    }
  }
  out->kind = JV_LIST;
  out->flags = 0;
  out->u.l = l;
  return 0;
}
