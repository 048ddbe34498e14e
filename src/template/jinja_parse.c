/* Jinja parser: tokens to an AST of statements and expressions, with jinja2's operator
 * precedence. Filters and tests are resolved here so an unknown one fails at parse time. */
#include <string.h>

#include "template/jinja_internal.h"

#define JP_MAX_DEPTH 200

typedef struct {
  jarena *a;
  const jtok *t;
  size_t n, pos;
  ts_err *err;
  int depth;
  int loops; /* enclosing for-loops (break/continue allowed) */
} parser;

typedef struct {
  jnode **v;
  size_t n, cap;
} nvec;

static const jtok *cur(parser *P) { return &P->t[P->pos]; }
static const jtok *peek(parser *P, size_t k) {
  size_t i = P->pos + k;
  return &P->t[i < P->n ? i : P->n - 1];
}
static void adv(parser *P) {
  if (P->pos + 1 < P->n) P->pos++;
}

static int is_op(const jtok *t, const char *op) {
  return t->type == JT_OP && t->len == strlen(op) && memcmp(t->s, op, t->len) == 0;
}
static int is_name(const jtok *t, const char *name) {
  return t->type == JT_NAME && t->len == strlen(name) && memcmp(t->s, name, t->len) == 0;
}

static const char *tok_desc(const jtok *t, char *buf, size_t n) {
  switch (t->type) {
  case JT_EOF: return "end of template";
  case JT_DATA: return "template data";
  case JT_VAR_BEGIN: return "'{{'";
  case JT_VAR_END: return "'}}'";
  case JT_BLOCK_BEGIN: return "'{%'";
  case JT_BLOCK_END: return "'%}'";
  case JT_STRING: return "string literal";
  case JT_INT: case JT_FLOAT: return "number";
  default: snprintf(buf, n, "'%.*s'", (int)(t->len > 40 ? 40 : t->len), t->s); return buf;
  }
}

static int perr(parser *P, const char *fmt, const char *what) {
  char m[256];
  snprintf(m, sizeof m, fmt, what);
  return ts_errorf(P->err, TS_EFORMAT, "%s at line %d", m, cur(P)->line);
}

static int unexpected(parser *P) {
  char b[64];
  return perr(P, "unexpected %s", tok_desc(cur(P), b, sizeof b));
}

static int expect_op(parser *P, const char *op) {
  if (!is_op(cur(P), op)) {
    char b[64], m[128];
    snprintf(m, sizeof m, "expected '%s', got %%s", op);
    return perr(P, m, tok_desc(cur(P), b, sizeof b));
  }
  adv(P);
  return 0;
}

static int oom(parser *P) { return ts_errorf(P->err, TS_ENOMEM, "out of memory while parsing template"); }

static jnode *mk(parser *P, int kind, int line) {
  jnode *n = jarena_alloc(P->a, sizeof *n);
  if (n) {
    n->kind = (uint8_t)kind;
    n->line = line;
  }
  return n;
}

static int nv_push(parser *P, nvec *v, jnode *x) {
  if (v->n == v->cap) {
    size_t cap = v->cap ? v->cap * 2 : 4;
    jnode **nv = jarena_alloc(P->a, cap * sizeof *nv);
    if (!nv) return oom(P);
    if (v->n) memcpy(nv, v->v, v->n * sizeof *nv);
    v->v = nv;
    v->cap = cap;
  }
  v->v[v->n++] = x;
  return 0;
}
static jnodes nv_done(nvec *v) {
  jnodes r = {v->v, v->n};
  return r;
}

static int parse_expr(parser *P, int with_cond, jnode **out);
static int parse_tuple(parser *P, int with_cond, int explicit_parens, jnode **out);
static int parse_unary(parser *P, int with_filter, jnode **out);
static int parse_body(parser *P, const char *const *ends, int nends, jnodes *out);

/* ---- expressions ---- */

/* "(" args ")" into node->args / kwnames / kwvals. The "(" is current. */
static int parse_call_args(parser *P, jnode *n) {
  TS_TRY(expect_op(P, "("));
  nvec pos = {0}, kwv = {0};
  size_t nk = 0, capk = 0;
  const char **kn = NULL;
  size_t *kl = NULL;
  while (!is_op(cur(P), ")")) {
    if (pos.n + nk > 0) {
      TS_TRY(expect_op(P, ","));
      if (is_op(cur(P), ")")) break;
    }
    if (is_op(cur(P), "*") || is_op(cur(P), "**")) return perr(P, "unsupported %s arguments", "*args/**kwargs");
    if (cur(P)->type == JT_NAME && is_op(peek(P, 1), "=")) {
      if (nk == capk) {
        size_t cap = capk ? capk * 2 : 4;
        const char **k2 = jarena_alloc(P->a, cap * sizeof *k2);
        size_t *l2 = jarena_alloc(P->a, cap * sizeof *l2);
        if (!k2 || !l2) return oom(P);
        if (nk) {
          memcpy(k2, kn, nk * sizeof *k2);
          memcpy(l2, kl, nk * sizeof *l2);
        }
        kn = k2;
        kl = l2;
        capk = cap;
      }
      kn[nk] = cur(P)->s;
      kl[nk] = cur(P)->len;
      nk++;
      adv(P);
      adv(P);
      jnode *v = NULL;
      TS_TRY(parse_expr(P, 1, &v));
      TS_TRY(nv_push(P, &kwv, v));
    } else {
      if (nk) return perr(P, "%s", "positional argument after keyword argument");
      jnode *v = NULL;
      TS_TRY(parse_expr(P, 1, &v));
      TS_TRY(nv_push(P, &pos, v));
    }
  }
  adv(P);
  n->args = nv_done(&pos);
  n->kwvals = nv_done(&kwv);
  n->kwnames = kn;
  n->kwlens = kl;
  return 0;
}

static int parse_primary(parser *P, jnode **out) {
  const jtok *t = cur(P);
  jnode *n = NULL;
  if (t->type == JT_NAME) {
    static const char *lits[] = {"true", "false", "none", "True", "False", "None"};
    for (int k = 0; k < 6; k++) {
      if (is_name(t, lits[k])) {
        if (!(n = mk(P, JN_LITERAL, t->line))) return oom(P);
        n->lit = (k % 3 == 2) ? jv_none() : jv_bool(k % 3 == 0);
        adv(P);
        *out = n;
        return 0;
      }
    }
    if (!(n = mk(P, JN_NAME, t->line))) return oom(P);
    n->name = t->s;
    n->nlen = t->len;
    adv(P);
  } else if (t->type == JT_STRING) {
    if (!(n = mk(P, JN_LITERAL, t->line))) return oom(P);
    /* Adjacent string literals concatenate, as in Python. */
    size_t total = 0, k = 0;
    while (peek(P, k)->type == JT_STRING) total += peek(P, k++)->len;
    char *s = jarena_alloc(P->a, sizeof(jstr) + total + 1);
    if (!s) return oom(P);
    jstr *js = (jstr *)s;
    js->len = total;
    size_t o = 0;
    while (cur(P)->type == JT_STRING) {
      memcpy(js->s + o, cur(P)->s, cur(P)->len);
      o += cur(P)->len;
      adv(P);
    }
    n->lit.kind = JV_STR;
    n->lit.u.s = js;
  } else if (t->type == JT_INT || t->type == JT_FLOAT) {
    if (!(n = mk(P, JN_LITERAL, t->line))) return oom(P);
    n->lit = t->type == JT_INT ? jv_int(t->i) : jv_float(t->f);
    adv(P);
  } else if (is_op(t, "(")) {
    adv(P);
    TS_TRY(parse_tuple(P, 1, 1, &n));
    TS_TRY(expect_op(P, ")"));
  } else if (is_op(t, "[") || is_op(t, "{")) {
    int is_dict = is_op(t, "{");
    if (!(n = mk(P, is_dict ? JN_DICT : JN_LIST, t->line))) return oom(P);
    adv(P);
    nvec keys = {0}, vals = {0};
    const char *close = is_dict ? "}" : "]";
    while (!is_op(cur(P), close)) {
      if (keys.n) {
        TS_TRY(expect_op(P, ","));
        if (is_op(cur(P), close)) break;
      }
      jnode *k = NULL;
      TS_TRY(parse_expr(P, 1, &k));
      TS_TRY(nv_push(P, &keys, k));
      if (is_dict) {
        TS_TRY(expect_op(P, ":"));
        jnode *v = NULL;
        TS_TRY(parse_expr(P, 1, &v));
        TS_TRY(nv_push(P, &vals, v));
      }
    }
    adv(P);
    n->args = nv_done(&keys);
    n->kwvals = nv_done(&vals);
  } else {
    return unexpected(P);
  }
  *out = n;
  return 0;
}

static int parse_subscript_arg(parser *P, jnode **out) {
  jnode *parts[3] = {0};
  int line = cur(P)->line;
  if (!is_op(cur(P), ":")) {
    TS_TRY(parse_expr(P, 1, &parts[0]));
    if (!is_op(cur(P), ":")) {
      if (is_op(cur(P), ",")) return perr(P, "unsupported %s", "tuple subscript");
      *out = parts[0];
      return 0;
    }
  }
  adv(P); /* ':' */
  if (!is_op(cur(P), "]") && !is_op(cur(P), ":")) TS_TRY(parse_expr(P, 1, &parts[1]));
  if (is_op(cur(P), ":")) {
    adv(P);
    if (!is_op(cur(P), "]")) TS_TRY(parse_expr(P, 1, &parts[2]));
  }
  jnode *n = mk(P, JN_SLICE, line);
  if (!n) return oom(P);
  n->a = parts[0];
  n->b = parts[1];
  n->c = parts[2];
  *out = n;
  return 0;
}

static int parse_postfix(parser *P, jnode **io) {
  for (;;) {
    const jtok *t = cur(P);
    if (is_op(t, ".")) {
      adv(P);
      const jtok *k = cur(P);
      jnode *n = NULL;
      if (k->type == JT_NAME) {
        if (!(n = mk(P, JN_GETATTR, k->line))) return oom(P);
        n->name = k->s;
        n->nlen = k->len;
      } else if (k->type == JT_INT) {
        if (!(n = mk(P, JN_GETITEM, k->line))) return oom(P);
        jnode *idx = mk(P, JN_LITERAL, k->line);
        if (!idx) return oom(P);
        idx->lit = jv_int(k->i);
        n->b = idx;
      } else {
        return perr(P, "%s", "expected a name after '.'");
      }
      adv(P);
      n->a = *io;
      *io = n;
    } else if (is_op(t, "[")) {
      jnode *n = mk(P, JN_GETITEM, t->line);
      if (!n) return oom(P);
      adv(P);
      TS_TRY(parse_subscript_arg(P, &n->b));
      TS_TRY(expect_op(P, "]"));
      n->a = *io;
      *io = n;
    } else if (is_op(t, "(")) {
      jnode *n = mk(P, JN_CALL, t->line);
      if (!n) return oom(P);
      TS_TRY(parse_call_args(P, n));
      n->a = *io;
      *io = n;
    } else {
      return 0;
    }
  }
}

/* "| name [args]" after the operand; n->a is filled by the caller. */
static int parse_filter(parser *P, jnode **out) {
  const jtok *t = cur(P);
  if (t->type != JT_NAME) return perr(P, "%s", "expected a filter name after '|'");
  jnode *f = mk(P, JN_FILTER, t->line);
  if (!f) return oom(P);
  f->name = t->s;
  f->nlen = t->len;
  f->id = jinja_filter_id(t->s, t->len);
  if (f->id < 0) {
    char nm[80];
    snprintf(nm, sizeof nm, "%.*s", (int)(t->len > 60 ? 60 : t->len), t->s);
    return perr(P, "unsupported filter '%s'", nm);
  }
  adv(P);
  if (is_op(cur(P), "(")) TS_TRY(parse_call_args(P, f));
  *out = f;
  return 0;
}

static int parse_filter_expr(parser *P, jnode **io) {
  for (;;) {
    const jtok *t = cur(P);
    if (is_op(t, "|")) {
      adv(P);
      jnode *f = NULL;
      TS_TRY(parse_filter(P, &f));
      f->a = *io;
      *io = f;
    } else if (is_name(t, "is")) {
      adv(P);
      jnode *n = mk(P, JN_TEST, t->line);
      if (!n) return oom(P);
      if (is_name(cur(P), "not")) {
        n->op = 1;
        adv(P);
      }
      const jtok *k = cur(P);
      if (k->type != JT_NAME) return perr(P, "%s", "expected a test name after 'is'");
      n->name = k->s;
      n->nlen = k->len;
      n->id = jinja_test_id(k->s, k->len);
      if (n->id < 0) {
        char nm[80];
        snprintf(nm, sizeof nm, "%.*s", (int)(k->len > 60 ? 60 : k->len), k->s);
        return perr(P, "unsupported test '%s'", nm);
      }
      adv(P);
      k = cur(P);
      if (is_op(k, "(")) {
        TS_TRY(parse_call_args(P, n));
      } else if ((k->type == JT_NAME || k->type == JT_STRING || k->type == JT_INT || k->type == JT_FLOAT ||
                  is_op(k, "[") || is_op(k, "{")) &&
                 !is_name(k, "else") && !is_name(k, "or") && !is_name(k, "and")) {
        if (is_name(k, "is")) return perr(P, "%s", "cannot chain tests with 'is'");
        jnode *arg = NULL;
        TS_TRY(parse_primary(P, &arg));
        TS_TRY(parse_postfix(P, &arg));
        nvec v = {0};
        TS_TRY(nv_push(P, &v, arg));
        n->args = nv_done(&v);
      }
      n->a = *io;
      *io = n;
    } else if (is_op(t, "(")) {
      jnode *n = mk(P, JN_CALL, t->line);
      if (!n) return oom(P);
      TS_TRY(parse_call_args(P, n));
      n->a = *io;
      *io = n;
    } else {
      return 0;
    }
  }
}

static int parse_unary(parser *P, int with_filter, jnode **out) {
  if (++P->depth > JP_MAX_DEPTH) return perr(P, "%s", "expression nested too deeply");
  const jtok *t = cur(P);
  jnode *n = NULL;
  if (is_op(t, "-") || is_op(t, "+")) {
    if (!(n = mk(P, is_op(t, "-") ? JN_NEG : JN_POS, t->line))) return oom(P);
    adv(P);
    TS_TRY(parse_unary(P, 0, &n->a));
  } else {
    TS_TRY(parse_primary(P, &n));
  }
  TS_TRY(parse_postfix(P, &n));
  if (with_filter) TS_TRY(parse_filter_expr(P, &n));
  P->depth--;
  *out = n;
  return 0;
}

static int mk_bin(parser *P, int op, int line, jnode *l, jnode *r, jnode **out) {
  jnode *n = mk(P, JN_BINARY, line);
  if (!n) return oom(P);
  n->op = (uint8_t)op;
  n->a = l;
  n->b = r;
  *out = n;
  return 0;
}

static int parse_pow(parser *P, jnode **out) {
  TS_TRY(parse_unary(P, 1, out));
  while (is_op(cur(P), "**")) {
    int line = cur(P)->line;
    adv(P);
    jnode *r = NULL;
    TS_TRY(parse_unary(P, 1, &r));
    TS_TRY(mk_bin(P, JOP_POW, line, *out, r, out));
  }
  return 0;
}

static int parse_math2(parser *P, jnode **out) {
  TS_TRY(parse_pow(P, out));
  for (;;) {
    const jtok *t = cur(P);
    int op = is_op(t, "*") ? JOP_MUL : is_op(t, "/") ? JOP_DIV : is_op(t, "//") ? JOP_FLOORDIV
           : is_op(t, "%") ? JOP_MOD : -1;
    if (op < 0) return 0;
    adv(P);
    jnode *r = NULL;
    TS_TRY(parse_pow(P, &r));
    TS_TRY(mk_bin(P, op, t->line, *out, r, out));
  }
}

static int parse_concat(parser *P, jnode **out) {
  TS_TRY(parse_math2(P, out));
  while (is_op(cur(P), "~")) {
    int line = cur(P)->line;
    adv(P);
    jnode *r = NULL;
    TS_TRY(parse_math2(P, &r));
    TS_TRY(mk_bin(P, JOP_CONCAT, line, *out, r, out));
  }
  return 0;
}

static int parse_math1(parser *P, jnode **out) {
  TS_TRY(parse_concat(P, out));
  for (;;) {
    const jtok *t = cur(P);
    int op = is_op(t, "+") ? JOP_ADD : is_op(t, "-") ? JOP_SUB : -1;
    if (op < 0) return 0;
    adv(P);
    jnode *r = NULL;
    TS_TRY(parse_concat(P, &r));
    TS_TRY(mk_bin(P, op, t->line, *out, r, out));
  }
}

static int parse_compare(parser *P, jnode **out) {
  jnode *first = NULL;
  TS_TRY(parse_math1(P, &first));
  nvec rest = {0};
  uint8_t ops[64];
  int line = cur(P)->line;
  for (;;) {
    const jtok *t = cur(P);
    int op = is_op(t, "==") ? JOP_EQ : is_op(t, "!=") ? JOP_NE : is_op(t, "<") ? JOP_LT : is_op(t, "<=") ? JOP_LE
           : is_op(t, ">") ? JOP_GT : is_op(t, ">=") ? JOP_GE : is_name(t, "in") ? JOP_IN : -1;
    if (op < 0 && is_name(t, "not") && is_name(peek(P, 1), "in")) {
      op = JOP_NOTIN;
      adv(P);
    }
    if (op < 0) break;
    if (rest.n >= sizeof ops) return perr(P, "%s", "too many chained comparisons");
    adv(P);
    jnode *r = NULL;
    TS_TRY(parse_math1(P, &r));
    ops[rest.n] = (uint8_t)op;
    TS_TRY(nv_push(P, &rest, r));
  }
  if (!rest.n) {
    *out = first;
    return 0;
  }
  jnode *n = mk(P, JN_COMPARE, line);
  if (!n) return oom(P);
  n->a = first;
  n->args = nv_done(&rest);
  n->ops = jarena_alloc(P->a, rest.n);
  if (!n->ops) return oom(P);
  memcpy(n->ops, ops, rest.n);
  *out = n;
  return 0;
}

static int parse_not(parser *P, jnode **out) {
  if (is_name(cur(P), "not")) {
    if (++P->depth > JP_MAX_DEPTH) return perr(P, "%s", "expression nested too deeply");
    jnode *n = mk(P, JN_NOT, cur(P)->line);
    if (!n) return oom(P);
    adv(P);
    TS_TRY(parse_not(P, &n->a));
    P->depth--;
    *out = n;
    return 0;
  }
  return parse_compare(P, out);
}

static int parse_and(parser *P, jnode **out) {
  TS_TRY(parse_not(P, out));
  while (is_name(cur(P), "and")) {
    jnode *n = mk(P, JN_AND, cur(P)->line);
    if (!n) return oom(P);
    adv(P);
    n->a = *out;
    TS_TRY(parse_not(P, &n->b));
    *out = n;
  }
  return 0;
}

static int parse_or(parser *P, jnode **out) {
  TS_TRY(parse_and(P, out));
  while (is_name(cur(P), "or")) {
    jnode *n = mk(P, JN_OR, cur(P)->line);
    if (!n) return oom(P);
    adv(P);
    n->a = *out;
    TS_TRY(parse_and(P, &n->b));
    *out = n;
  }
  return 0;
}

static int parse_expr(parser *P, int with_cond, jnode **out) {
  if (++P->depth > JP_MAX_DEPTH) return perr(P, "%s", "expression nested too deeply");
  TS_TRY(parse_or(P, out));
  while (with_cond && is_name(cur(P), "if")) {
    jnode *n = mk(P, JN_COND, cur(P)->line);
    if (!n) return oom(P);
    adv(P);
    n->b = *out;
    TS_TRY(parse_or(P, &n->a));
    if (is_name(cur(P), "else")) {
      adv(P);
      TS_TRY(parse_expr(P, 1, &n->c));
    }
    *out = n;
  }
  P->depth--;
  return 0;
}

static int tuple_end(parser *P) {
  const jtok *t = cur(P);
  return t->type == JT_VAR_END || t->type == JT_BLOCK_END || t->type == JT_EOF || is_op(t, ")");
}

static int parse_tuple(parser *P, int with_cond, int explicit_parens, jnode **out) {
  int line = cur(P)->line, is_tuple = 0;
  nvec items = {0};
  for (;;) {
    if (items.n) TS_TRY(expect_op(P, ","));
    if (tuple_end(P)) break;
    jnode *e = NULL;
    TS_TRY(parse_expr(P, with_cond, &e));
    TS_TRY(nv_push(P, &items, e));
    if (is_op(cur(P), ",")) is_tuple = 1;
    else break;
  }
  if (!is_tuple) {
    if (items.n) {
      *out = items.v[0];
      return 0;
    }
    if (!explicit_parens) return unexpected(P);
  }
  jnode *n = mk(P, JN_TUPLE, line);
  if (!n) return oom(P);
  n->args = nv_done(&items);
  *out = n;
  return 0;
}

/* ---- statements ---- */

static int expect_block_end(parser *P) {
  if (cur(P)->type != JT_BLOCK_END) {
    char b[64];
    return perr(P, "expected end of statement, got %s", tok_desc(cur(P), b, sizeof b));
  }
  adv(P);
  return 0;
}

/* An assignment target: name, name.attr (namespace) or a tuple of names. */
static int parse_target(parser *P, int allow_attr, jnode **out) {
  int line = cur(P)->line, parens = 0;
  if (is_op(cur(P), "(")) {
    parens = 1;
    adv(P);
  }
  nvec names = {0};
  for (;;) {
    const jtok *t = cur(P);
    if (t->type != JT_NAME) return perr(P, "%s", "expected a name to assign to");
    jnode *n = mk(P, JN_NAME, t->line);
    if (!n) return oom(P);
    n->name = t->s;
    n->nlen = t->len;
    adv(P);
    if (allow_attr && !names.n && is_op(cur(P), ".")) {
      adv(P);
      if (cur(P)->type != JT_NAME) return perr(P, "%s", "expected an attribute name");
      jnode *g = mk(P, JN_GETATTR, cur(P)->line);
      if (!g) return oom(P);
      g->a = n;
      g->name = cur(P)->s;
      g->nlen = cur(P)->len;
      adv(P);
      *out = g;
      return parens ? expect_op(P, ")") : 0;
    }
    TS_TRY(nv_push(P, &names, n));
    if (!is_op(cur(P), ",")) break;
    adv(P);
    if (cur(P)->type != JT_NAME) break;
  }
  if (parens) TS_TRY(expect_op(P, ")"));
  if (names.n == 1 && !parens) {
    *out = names.v[0];
    return 0;
  }
  jnode *n = mk(P, JN_TUPLE, line);
  if (!n) return oom(P);
  n->args = nv_done(&names);
  *out = n;
  return 0;
}

/* Consumes "{% name" for an expected end tag name (the block begin is current). */
static int end_tag(parser *P, const char *name) {
  adv(P); /* {% */
  if (!is_name(cur(P), name)) return unexpected(P);
  adv(P);
  return 0;
}

static const char *cur_block_name(parser *P, char *buf, size_t n) {
  const jtok *t = peek(P, 1);
  snprintf(buf, n, "%.*s", (int)(t->len > 40 ? 40 : t->len), t->type == JT_NAME ? t->s : "");
  return buf;
}

static int parse_if(parser *P, jnode **out) {
  jnode *n = mk(P, JN_IF, cur(P)->line);
  if (!n) return oom(P);
  adv(P); /* if / elif */
  TS_TRY(parse_tuple(P, 0, 0, &n->a));
  TS_TRY(expect_block_end(P));
  static const char *const ends[] = {"elif", "else", "endif"};
  TS_TRY(parse_body(P, ends, 3, &n->body));
  char b[48];
  cur_block_name(P, b, sizeof b);
  if (!strcmp(b, "elif")) {
    n->op = 1; /* orelse holds the elif chain */
    adv(P);
    jnode *e = NULL;
    TS_TRY(parse_if(P, &e));
    nvec v = {0};
    TS_TRY(nv_push(P, &v, e));
    n->orelse = nv_done(&v);
    *out = n;
    return 0; /* the nested if consumed endif */
  }
  if (!strcmp(b, "else")) {
    TS_TRY(end_tag(P, "else"));
    TS_TRY(expect_block_end(P));
    static const char *const ends2[] = {"endif"};
    TS_TRY(parse_body(P, ends2, 1, &n->orelse));
  }
  TS_TRY(end_tag(P, "endif"));
  TS_TRY(expect_block_end(P));
  *out = n;
  return 0;
}

static int parse_for(parser *P, jnode **out) {
  jnode *n = mk(P, JN_FOR, cur(P)->line);
  if (!n) return oom(P);
  adv(P);
  TS_TRY(parse_target(P, 0, &n->a));
  if (!is_name(cur(P), "in")) return perr(P, "%s", "expected 'in' in for loop");
  adv(P);
  TS_TRY(parse_tuple(P, 0, 0, &n->b));
  if (is_name(cur(P), "if")) {
    adv(P);
    TS_TRY(parse_expr(P, 1, &n->c));
  }
  if (is_name(cur(P), "recursive")) return perr(P, "unsupported %s", "recursive for loop");
  TS_TRY(expect_block_end(P));
  static const char *const ends[] = {"endfor", "else"};
  P->loops++;
  TS_TRY(parse_body(P, ends, 2, &n->body));
  P->loops--;
  char b[48];
  if (!strcmp(cur_block_name(P, b, sizeof b), "else")) {
    TS_TRY(end_tag(P, "else"));
    TS_TRY(expect_block_end(P));
    static const char *const ends2[] = {"endfor"};
    TS_TRY(parse_body(P, ends2, 1, &n->orelse));
  }
  TS_TRY(end_tag(P, "endfor"));
  TS_TRY(expect_block_end(P));
  *out = n;
  return 0;
}

static int parse_set(parser *P, jnode **out) {
  int line = cur(P)->line;
  adv(P);
  jnode *target = NULL;
  TS_TRY(parse_target(P, 1, &target));
  if (is_op(cur(P), "=")) {
    adv(P);
    jnode *n = mk(P, JN_SET, line);
    if (!n) return oom(P);
    n->a = target;
    TS_TRY(parse_tuple(P, 1, 0, &n->b));
    TS_TRY(expect_block_end(P));
    *out = n;
    return 0;
  }
  if (target->kind != JN_NAME) return perr(P, "%s", "a block set needs a single name");
  if (is_op(cur(P), "|")) return perr(P, "unsupported %s", "filter on a block set");
  TS_TRY(expect_block_end(P));
  jnode *n = mk(P, JN_SET_BLOCK, line);
  if (!n) return oom(P);
  n->a = target;
  static const char *const ends[] = {"endset"};
  TS_TRY(parse_body(P, ends, 1, &n->body));
  TS_TRY(end_tag(P, "endset"));
  TS_TRY(expect_block_end(P));
  *out = n;
  return 0;
}

static int parse_macro(parser *P, jnode **out) {
  jnode *n = mk(P, JN_MACRO, cur(P)->line);
  if (!n) return oom(P);
  adv(P);
  if (cur(P)->type != JT_NAME) return perr(P, "%s", "expected a macro name");
  n->name = cur(P)->s;
  n->nlen = cur(P)->len;
  adv(P);
  TS_TRY(expect_op(P, "("));
  nvec params = {0}, defs = {0};
  while (!is_op(cur(P), ")")) {
    if (params.n) TS_TRY(expect_op(P, ","));
    if (is_op(cur(P), ")")) break;
    if (cur(P)->type != JT_NAME) return perr(P, "%s", "expected a parameter name");
    jnode *p = mk(P, JN_NAME, cur(P)->line);
    if (!p) return oom(P);
    p->name = cur(P)->s;
    p->nlen = cur(P)->len;
    adv(P);
    jnode *d = NULL;
    if (is_op(cur(P), "=")) {
      adv(P);
      TS_TRY(parse_expr(P, 1, &d));
    } else if (defs.n && defs.v[defs.n - 1]) {
      return perr(P, "%s", "non-default macro parameter after a default one");
    }
    TS_TRY(nv_push(P, &params, p));
    TS_TRY(nv_push(P, &defs, d));
  }
  adv(P);
  TS_TRY(expect_block_end(P));
  int loops = P->loops;
  P->loops = 0;
  static const char *const ends[] = {"endmacro"};
  TS_TRY(parse_body(P, ends, 1, &n->body));
  P->loops = loops;
  TS_TRY(end_tag(P, "endmacro"));
  if (cur(P)->type == JT_NAME) adv(P);
  TS_TRY(expect_block_end(P));
  n->args = nv_done(&params);
  n->kwvals = nv_done(&defs);
  *out = n;
  return 0;
}

static int parse_filter_block(parser *P, jnode **out) {
  int line = cur(P)->line;
  adv(P);
  jnode *chain = NULL;
  do {
    if (chain) adv(P); /* '|' */
    jnode *f = NULL;
    TS_TRY(parse_filter(P, &f));
    f->a = chain;
    chain = f;
  } while (is_op(cur(P), "|"));
  TS_TRY(expect_block_end(P));
  jnode *n = mk(P, JN_FILTER_BLOCK, line);
  if (!n) return oom(P);
  n->a = chain;
  static const char *const ends[] = {"endfilter"};
  TS_TRY(parse_body(P, ends, 1, &n->body));
  TS_TRY(end_tag(P, "endfilter"));
  TS_TRY(expect_block_end(P));
  *out = n;
  return 0;
}

static int parse_stmt(parser *P, jnode **out) {
  adv(P); /* {% */
  const jtok *t = cur(P);
  if (t->type != JT_NAME) return perr(P, "%s", "expected a statement name after '{%'");
  if (is_name(t, "if")) return parse_if(P, out);
  if (is_name(t, "for")) return parse_for(P, out);
  if (is_name(t, "set")) return parse_set(P, out);
  if (is_name(t, "macro")) return parse_macro(P, out);
  if (is_name(t, "filter")) return parse_filter_block(P, out);
  if (is_name(t, "break") || is_name(t, "continue")) {
    if (!P->loops) return perr(P, "'%s' outside of a for loop", is_name(t, "break") ? "break" : "continue");
    jnode *n = mk(P, is_name(t, "break") ? JN_BREAK : JN_CONTINUE, t->line);
    if (!n) return oom(P);
    adv(P);
    TS_TRY(expect_block_end(P));
    *out = n;
    return 0;
  }
  if (is_name(t, "generation")) {
    jnode *n = mk(P, JN_SCOPE, t->line);
    if (!n) return oom(P);
    adv(P);
    TS_TRY(expect_block_end(P));
    static const char *const ends[] = {"endgeneration"};
    TS_TRY(parse_body(P, ends, 1, &n->body));
    TS_TRY(end_tag(P, "endgeneration"));
    TS_TRY(expect_block_end(P));
    *out = n;
    return 0;
  }
  char nm[80];
  snprintf(nm, sizeof nm, "%.*s", (int)(t->len > 60 ? 60 : t->len), t->s);
  static const char *const enders[] = {"endif", "endfor", "endset", "endmacro", "endfilter", "endgeneration",
                                       "elif", "else", "endraw", "endcall", "endblock"};
  for (size_t k = 0; k < sizeof enders / sizeof *enders; k++)
    if (!strcmp(nm, enders[k])) return perr(P, "unexpected '%s'", nm);
  return perr(P, "unsupported tag '%s'", nm);
}

static int parse_body(parser *P, const char *const *ends, int nends, jnodes *out) {
  if (++P->depth > JP_MAX_DEPTH) return perr(P, "%s", "statements nested too deeply");
  nvec body = {0};
  for (;;) {
    const jtok *t = cur(P);
    if (t->type == JT_EOF) {
      if (nends) {
        const char *want = ends[0];
        for (int e = 0; e < nends; e++)
          if (!strncmp(ends[e], "end", 3)) want = ends[e];
        return perr(P, "unexpected end of template, expected '%s'", want);
      }
      break;
    }
    jnode *n = NULL;
    if (t->type == JT_DATA) {
      if (!(n = mk(P, JN_TEXT, t->line))) return oom(P);
      if (jv_str(P->a, t->s, t->len, &n->lit) < 0) return oom(P);
      adv(P);
    } else if (t->type == JT_VAR_BEGIN) {
      if (!(n = mk(P, JN_OUTPUT, t->line))) return oom(P);
      adv(P);
      TS_TRY(parse_tuple(P, 1, 0, &n->a));
      if (cur(P)->type != JT_VAR_END) {
        char b[64];
        return perr(P, "expected '}}', got %s", tok_desc(cur(P), b, sizeof b));
      }
      adv(P);
    } else if (t->type == JT_BLOCK_BEGIN) {
      const jtok *k = peek(P, 1);
      int is_end = 0;
      for (int e = 0; e < nends && k->type == JT_NAME; e++)
        if (is_name(k, ends[e])) is_end = 1;
      if (is_end) break;
      TS_TRY(parse_stmt(P, &n));
    } else {
      return unexpected(P);
    }
    TS_TRY(nv_push(P, &body, n));
  }
  P->depth--;
  *out = nv_done(&body);
  return 0;
}

int jinja_parse_tokens(jarena *a, const jtoks *toks, jnodes *out, ts_err *err) {
  parser P = {.a = a, .t = toks->v, .n = toks->n, .err = err};
  return parse_body(&P, NULL, 0, out);
}
