/* Compile-time scoping as jinja2 does it: a symbol analysis per frame (template, loop body, loop
 * else, macro, block set, filter block) that decides how each name a frame assigns starts out:
 * resolved from the context, aliased to the enclosing frame, or Undefined. Only the Undefined
 * case differs from a plain dynamic lookup, so the analysis records just those names per frame
 * and the evaluator binds them on frame entry. */
#include <stdlib.h>
#include <string.h>

#include "template/jinja_internal.h"

enum { K_RESOLVE = 1, K_ALIAS, K_UNDEF, K_PARAM };

typedef struct {
  const char *name;
  size_t len;
  int kind;
} jsym;

typedef struct jsymtab jsymtab;
struct jsymtab {
  const jsymtab *parent;
  jsym *refs;
  size_t nrefs, caprefs;
  jsym *stores; /* kind unused */
  size_t nst, capst;
};

/* A frame whose analysis waits until its parent frame is complete. */
typedef struct {
  const jnode *node;
  int which; /* 0: JN_FOR body / macro / block bodies, 1: JN_FOR else */
} pending;

typedef struct {
  jarena *a;
  ts_err *err;
  int oom;
  int too_deep; /* an expression tree deeper than JA_MAX_DEPTH (long operator/filter chains) */
  pending *todo;
  size_t ntodo, captodo;
} analyzer;

static long find_in(const jsym *v, size_t n, const char *name, size_t len) {
  for (size_t i = 0; i < n; i++)
    if (v[i].len == len && memcmp(v[i].name, name, len) == 0) return (long)i;
  return -1;
}

static int has_ref(const jsymtab *t, const char *name, size_t len) {
  for (; t; t = t->parent)
    if (find_in(t->refs, t->nrefs, name, len) >= 0) return 1;
  return 0;
}

static void push(analyzer *A, jsym **v, size_t *n, size_t *cap, jsym s) {
  if (*n == *cap) {
    size_t nc = *cap ? *cap * 2 : 8;
    jsym *nv = realloc(*v, nc * sizeof *nv);
    if (!nv) {
      A->oom = 1;
      return;
    }
    *v = nv;
    *cap = nc;
  }
  (*v)[(*n)++] = s;
}

static void define(analyzer *A, jsymtab *t, const char *name, size_t len, int kind) {
  long i = find_in(t->refs, t->nrefs, name, len);
  if (i >= 0) t->refs[i].kind = kind;
  else push(A, &t->refs, &t->nrefs, &t->caprefs, (jsym){name, len, kind});
}

static void add_store(analyzer *A, jsymtab *t, const char *name, size_t len) {
  if (find_in(t->stores, t->nst, name, len) < 0) push(A, &t->stores, &t->nst, &t->capst, (jsym){name, len, 0});
}

static void sym_load(analyzer *A, jsymtab *t, const char *name, size_t len) {
  if (!has_ref(t, name, len)) define(A, t, name, len, K_RESOLVE);
}

static void sym_store(analyzer *A, jsymtab *t, const char *name, size_t len) {
  add_store(A, t, name, len);
  if (find_in(t->refs, t->nrefs, name, len) >= 0) return;
  define(A, t, name, len, t->parent && has_ref(t->parent, name, len) ? K_ALIAS : K_UNDEF);
}

static void sym_param(analyzer *A, jsymtab *t, const char *name, size_t len) {
  add_store(A, t, name, len);
  define(A, t, name, len, K_PARAM);
}

static void tab_free(jsymtab *t) {
  free(t->refs);
  free(t->stores);
}

static void tab_copy(analyzer *A, jsymtab *dst, const jsymtab *src) {
  memset(dst, 0, sizeof *dst);
  dst->parent = src->parent;
  for (size_t i = 0; i < src->nrefs; i++) push(A, &dst->refs, &dst->nrefs, &dst->caprefs, src->refs[i]);
  for (size_t i = 0; i < src->nst; i++) push(A, &dst->stores, &dst->nst, &dst->capst, src->stores[i]);
}

/* Every name stored in some branch (and not before) starts resolved or aliased, never Undefined. */
static void branch_update(analyzer *A, jsymtab *t, jsymtab *br, int nbr) {
  jsym *fresh = NULL;
  size_t nf = 0, capf = 0;
  for (int b = 0; b < nbr; b++)
    for (size_t i = 0; i < br[b].nst; i++)
      if (find_in(t->stores, t->nst, br[b].stores[i].name, br[b].stores[i].len) < 0 &&
          find_in(fresh, nf, br[b].stores[i].name, br[b].stores[i].len) < 0)
        push(A, &fresh, &nf, &capf, br[b].stores[i]);
  for (int b = 0; b < nbr; b++) {
    for (size_t i = 0; i < br[b].nrefs; i++) define(A, t, br[b].refs[i].name, br[b].refs[i].len, br[b].refs[i].kind);
    for (size_t i = 0; i < br[b].nst; i++) add_store(A, t, br[b].stores[i].name, br[b].stores[i].len);
  }
  for (size_t i = 0; i < nf; i++)
    define(A, t, fresh[i].name, fresh[i].len,
           t->parent && has_ref(t->parent, fresh[i].name, fresh[i].len) ? K_ALIAS : K_RESOLVE);
  free(fresh);
}

static void later(analyzer *A, const jnode *n, int which) {
  if (A->ntodo == A->captodo) {
    size_t nc = A->captodo ? A->captodo * 2 : 8;
    pending *nv = realloc(A->todo, nc * sizeof *nv);
    if (!nv) {
      A->oom = 1;
      return;
    }
    A->todo = nv;
    A->captodo = nc;
  }
  A->todo[A->ntodo++] = (pending){n, which};
}

#define JA_MAX_DEPTH 400

static void visit_expr_d(analyzer *A, jsymtab *t, const jnode *n, int depth) {
  if (!n || A->too_deep) return;
  if (depth > JA_MAX_DEPTH) {
    A->too_deep = n->line;
    return;
  }
  if (n->kind == JN_NAME) {
    sym_load(A, t, n->name, n->nlen);
    return;
  }
  visit_expr_d(A, t, n->a, depth + 1);
  visit_expr_d(A, t, n->b, depth + 1);
  visit_expr_d(A, t, n->c, depth + 1);
  for (size_t i = 0; i < n->args.n; i++) visit_expr_d(A, t, n->args.v[i], depth + 1);
  for (size_t i = 0; i < n->kwvals.n; i++) visit_expr_d(A, t, n->kwvals.v[i], depth + 1);
}

static void visit_expr(analyzer *A, jsymtab *t, const jnode *n) { visit_expr_d(A, t, n, 0); }

static void visit_stmts(analyzer *A, jsymtab *t, const jnodes *body);

static void visit_branch(analyzer *A, jsymtab *t, jsymtab *out, const jnode *const *stmts, size_t n, int as_if) {
  tab_copy(A, out, t);
  for (size_t i = 0; i < n; i++) {
    if (as_if) {
      /* An elif: its own test, body, and empty elif/else branches. */
      const jnode *e = stmts[i];
      visit_expr(A, out, e->a);
      jsymtab br[3];
      visit_branch(A, out, &br[0], (const jnode *const *)e->body.v, e->body.n, 0);
      tab_copy(A, &br[1], out);
      tab_copy(A, &br[2], out);
      branch_update(A, out, br, 3);
      for (int k = 0; k < 3; k++) tab_free(&br[k]);
    } else {
      jnodes one = {(jnode **)&stmts[i], 1};
      visit_stmts(A, out, &one);
    }
  }
}

static void visit_if(analyzer *A, jsymtab *t, const jnode *n) {
  visit_expr(A, t, n->a);
  /* Flatten our nested elif chain into jinja2's If(body, elif_[], else_). */
  const jnode *elifs[256];
  size_t ne = 0;
  const jnode *last = n;
  while (last->op == 1 && last->orelse.n == 1 && ne < 256) {
    last = last->orelse.v[0];
    elifs[ne++] = last;
  }
  jsymtab br[3];
  visit_branch(A, t, &br[0], (const jnode *const *)n->body.v, n->body.n, 0);
  visit_branch(A, t, &br[1], elifs, ne, 1);
  if (last->op == 1) visit_branch(A, t, &br[2], NULL, 0, 0);
  else visit_branch(A, t, &br[2], (const jnode *const *)last->orelse.v, last->orelse.n, 0);
  branch_update(A, t, br, 3);
  for (int k = 0; k < 3; k++) tab_free(&br[k]);
}

static void visit_target(analyzer *A, jsymtab *t, const jnode *target, int param) {
  if (target->kind == JN_NAME) {
    if (param) sym_param(A, t, target->name, target->nlen);
    else sym_store(A, t, target->name, target->nlen);
  } else if (target->kind == JN_TUPLE) {
    for (size_t i = 0; i < target->args.n; i++) visit_target(A, t, target->args.v[i], param);
  } else if (target->kind == JN_GETATTR) {
    sym_load(A, t, target->a->name, target->a->nlen); /* ns.attr reads ns */
  }
}

static void visit_stmts(analyzer *A, jsymtab *t, const jnodes *body) {
  for (size_t i = 0; i < body->n && !A->oom; i++) {
    const jnode *n = body->v[i];
    switch (n->kind) {
    case JN_OUTPUT: visit_expr(A, t, n->a); break;
    case JN_IF: visit_if(A, t, n); break;
    case JN_FOR:
      visit_expr(A, t, n->b);
      later(A, n, 0);
      if (n->orelse.n) later(A, n, 1);
      break;
    case JN_SET:
      visit_expr(A, t, n->b);
      visit_target(A, t, n->a, 0);
      break;
    case JN_SET_BLOCK:
      visit_target(A, t, n->a, 0);
      later(A, n, 0);
      break;
    case JN_MACRO:
      sym_store(A, t, n->name, n->nlen);
      later(A, n, 0);
      break;
    case JN_FILTER_BLOCK:
      for (const jnode *f = n->a; f; f = f->a) {
        for (size_t k = 0; k < f->args.n; k++) visit_expr(A, t, f->args.v[k]);
        for (size_t k = 0; k < f->kwvals.n; k++) visit_expr(A, t, f->kwvals.v[k]);
      }
      later(A, n, 0);
      break;
    case JN_SCOPE: visit_stmts(A, t, &n->body); break;
    default: break;
    }
  }
}

static int collect_undef(analyzer *A, const jsymtab *t, jnodes *out) {
  size_t k = 0;
  for (size_t i = 0; i < t->nrefs; i++) k += t->refs[i].kind == K_UNDEF;
  out->n = 0;
  out->v = NULL;
  if (!k) return 0;
  out->v = jarena_alloc(A->a, k * sizeof *out->v);
  if (!out->v) return A->oom = 1, -1;
  for (size_t i = 0; i < t->nrefs; i++) {
    if (t->refs[i].kind != K_UNDEF) continue;
    jnode *nm = jarena_alloc(A->a, sizeof *nm);
    if (!nm) return A->oom = 1, -1;
    nm->kind = JN_NAME;
    nm->name = t->refs[i].name;
    nm->nlen = t->refs[i].len;
    out->v[out->n++] = nm;
  }
  return 0;
}

/* Analyzes one frame, then (with this frame complete, as jinja2's code generator does) the frames
 * nested in it. */
static void analyze_frame(analyzer *A, const jsymtab *parent, const jnode *owner, int which, const jnodes *body,
                          jnodes *out, int depth) {
  if (depth > 256 || A->oom) return;
  jsymtab t = {.parent = parent};
  size_t first = A->ntodo;
  if (owner && owner->kind == JN_FOR && which == 0) {
    visit_target(A, &t, owner->a, 1);
    sym_param(A, &t, "loop", 4);
  } else if (owner && owner->kind == JN_MACRO) {
    for (size_t i = 0; i < owner->args.n; i++) sym_param(A, &t, owner->args.v[i]->name, owner->args.v[i]->nlen);
    for (size_t i = 0; i < owner->kwvals.n; i++) visit_expr(A, &t, owner->kwvals.v[i]);
  }
  visit_stmts(A, &t, body);
  collect_undef(A, &t, out);
  size_t last = A->ntodo;
  for (size_t i = first; i < last && !A->oom; i++) {
    jnode *c = (jnode *)A->todo[i].node;
    int w = A->todo[i].which;
    analyze_frame(A, &t, c, w, w ? &c->orelse : &c->body, w ? &c->undef2 : &c->undef, depth + 1);
  }
  A->ntodo = first;
  tab_free(&t);
}

int jinja_analyze_scopes(jinja_template *tpl, ts_err *err) {
  analyzer A = {.a = &tpl->arena, .err = err};
  analyze_frame(&A, NULL, NULL, 0, &tpl->body, &tpl->undef, 0);
  free(A.todo);
  if (A.oom) return ts_errorf(err, TS_ENOMEM, "out of memory analyzing template scopes");
  if (A.too_deep) return ts_errorf(err, TS_EFORMAT, "expression nested too deeply at line %d", A.too_deep);
  return 0;
}
