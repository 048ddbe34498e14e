/* Internal shapes of the Jinja interpreter shared by its files: arenas, the value type, tokens,
 * the AST, the render state and the builtin tables (filters, tests, methods, globals). */
#ifndef TESSERA_JINJA_INTERNAL_H
#define TESSERA_JINJA_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "template/jinja.h"

/* ---- arenas: everything of one template (AST) or one render (values) lives in one ---- */

typedef struct jarena_chunk jarena_chunk;
typedef struct {
  jarena_chunk *head;
  size_t total; /* bytes allocated so far */
  size_t limit; /* 0: unlimited */
} jarena;

void *jarena_alloc(jarena *a, size_t n); /* zeroed; NULL when out of memory or over the limit */
void jarena_free(jarena *a);

/* Growable byte buffer (malloc'ed) with an optional size limit. */
typedef struct {
  char *p;
  size_t len, cap;
  size_t limit; /* 0: unlimited */
  int over;     /* set once an append failed (limit or memory) */
} jbuf;

int jbuf_put(jbuf *b, const char *s, size_t n); /* 0 or -1 */
int jbuf_putc(jbuf *b, char c);
int jbuf_printf(jbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void jbuf_free(jbuf *b);

/* ---- values ---- */

typedef enum {
  JV_UNDEF, JV_NONE, JV_BOOL, JV_INT, JV_FLOAT, JV_STR, JV_LIST, JV_DICT, JV_NS, JV_FUNC
} jv_kind;

#define JV_F_TUPLE 1 /* a list that prints as a Python tuple */
#define JV_F_LOOP 2  /* a dict that is a loop object: attribute access only */

typedef struct jstr {
  size_t len;
  char s[]; /* len bytes of UTF-8 plus a NUL */
} jstr;

typedef struct jlist jlist;
typedef struct jdict jdict;
typedef struct jfunc jfunc;

typedef struct jv {
  uint8_t kind;
  uint8_t flags;
  union {
    int b;
    int64_t i;
    double f;
    const jstr *s;
    jlist *l;
    jdict *d;
    jfunc *fn;
    const char *why; /* JV_UNDEF: what was missing, for the error if it is used (may be NULL) */
  } u;
} jv;

struct jlist {
  size_t n, cap;
  jv *v;
};

/* Ordered like a Python dict: insertion order. */
struct jdict {
  size_t n, cap;
  jv *k;
  jv *v;
};

typedef struct jnode jnode;
typedef struct jscope jscope;

typedef enum { JF_GLOBAL, JF_METHOD, JF_MACRO } jfunc_kind;
struct jfunc {
  int kind;
  int id;             /* JF_GLOBAL: global id; JF_METHOD: method id */
  jv self;            /* JF_METHOD: the receiver */
  const jnode *macro; /* JF_MACRO */
  jscope *closure;    /* JF_MACRO: scope the macro was defined in */
};

/* ---- tokens and AST ---- */

typedef enum {
  JT_EOF, JT_DATA, JT_VAR_BEGIN, JT_VAR_END, JT_BLOCK_BEGIN, JT_BLOCK_END,
  JT_NAME, JT_STRING, JT_INT, JT_FLOAT, JT_OP
} jtok_type;

typedef struct {
  uint8_t type;
  int line;
  const char *s; /* NAME, OP: source text; DATA, STRING: decoded text (arena) */
  size_t len;
  int64_t i;
  double f;
} jtok;

typedef struct {
  jtok *v;
  size_t n, cap;
} jtoks;

int jinja_lex(jarena *a, const char *src, size_t len, jtoks *out, ts_err *err);

typedef enum {
  /* expressions */
  JN_LITERAL, JN_NAME, JN_LIST, JN_TUPLE, JN_DICT, JN_GETATTR, JN_GETITEM, JN_SLICE, JN_CALL,
  JN_FILTER, JN_TEST, JN_NEG, JN_POS, JN_NOT, JN_BINARY, JN_COMPARE, JN_AND, JN_OR, JN_COND,
  /* statements */
  JN_TEXT, JN_OUTPUT, JN_IF, JN_FOR, JN_SET, JN_SET_BLOCK, JN_MACRO, JN_BREAK, JN_CONTINUE,
  JN_FILTER_BLOCK, JN_SCOPE
} jn_kind;

/* Binary and comparison operators. */
enum {
  JOP_ADD, JOP_SUB, JOP_MUL, JOP_DIV, JOP_FLOORDIV, JOP_MOD, JOP_POW, JOP_CONCAT,
  JOP_EQ, JOP_NE, JOP_LT, JOP_LE, JOP_GT, JOP_GE, JOP_IN, JOP_NOTIN
};

typedef struct {
  jnode **v;
  size_t n;
} jnodes;

struct jnode {
  uint8_t kind;
  uint8_t op;  /* JN_BINARY: JOP_*; JN_TEST: 1 when negated ("is not") */
  int line;
  int id;      /* JN_FILTER / JN_TEST / JN_FILTER_BLOCK: builtin id */
  const char *name; /* JN_NAME, JN_GETATTR attribute, filter/test/macro name */
  size_t nlen;
  jv lit;           /* JN_LITERAL, JN_TEXT (a string) */
  jnode *a, *b, *c; /* operands; JN_FOR: a target, b iterable, c filter; JN_SET: a target, b value */
  jnodes args;      /* positional args, list/tuple items, dict keys, compare operands, macro params */
  jnodes kwvals;    /* keyword arg values, dict values, macro defaults (NULL entries allowed) */
  const char **kwnames;
  size_t *kwlens;
  uint8_t *ops;     /* JN_COMPARE: one JOP_* per element of args */
  jnodes body, orelse;
  /* Names a frame binds to Undefined on entry (jinja2's compile-time scoping, see jinja_scope.c):
   * JN_FOR: undef for the body (each iteration), undef2 for the else block; JN_MACRO,
   * JN_SET_BLOCK, JN_FILTER_BLOCK: undef for the body. */
  jnodes undef, undef2;
};

struct jinja_template {
  jarena arena;
  jnodes body;
  jnodes undef; /* template-level names bound to Undefined at the start */
};

int jinja_parse_tokens(jarena *a, const jtoks *toks, jnodes *out, ts_err *err);
/* jinja2 decides at compile time which frame owns each assigned name; a name assigned directly
 * in a frame (not under an if) and never read there before is Undefined in that frame until the
 * assignment, even if the context has it. Fills the undef lists of t and its nodes. */
int jinja_analyze_scopes(jinja_template *t, ts_err *err);

/* ---- render state ---- */

struct jscope {
  jscope *parent;
  size_t n, cap;
  const char **names;
  size_t *lens;
  jv *vals;
};

typedef struct {
  size_t max_output;  /* bytes of output (and of any one captured block) */
  size_t max_memory;  /* bytes of render arena */
  uint64_t max_steps; /* evaluated nodes and loop iterations */
  int max_depth;      /* nested macro calls and evaluation depth */
} jinja_limits;

typedef struct {
  jarena arena;
  ts_err *err;
  jinja_limits lim;
  uint64_t steps;
  int depth;       /* nested macro calls */
  int edepth;      /* nested expression evaluation */
  jbuf *out;       /* where output goes (swapped while capturing) */
  jscope *root;    /* template-level variables */
  jdict *ctx;      /* the render context */
} jrender;

/* Renders under explicit limits (the fuzzer uses small ones). */
int jinja_render_limited(const jinja_template *t, const json_t *ctx, const jinja_limits *lim,
                         char **out, size_t *len, ts_err *err);

/* Errors: record "<message> at line N" and return TS_EINVAL. */
int jr_fail(jrender *r, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int jr_oom(jrender *r, int line);

/* ---- value helpers (jinja_value.c) ---- */

static inline jv jv_undef(const char *why) { jv v = {.kind = JV_UNDEF}; v.u.why = why; return v; }
static inline jv jv_none(void) { jv v = {.kind = JV_NONE}; return v; }
static inline jv jv_bool(int b) { jv v = {.kind = JV_BOOL}; v.u.b = b ? 1 : 0; return v; }
static inline jv jv_int(int64_t i) { jv v = {.kind = JV_INT}; v.u.i = i; return v; }
static inline jv jv_float(double f) { jv v = {.kind = JV_FLOAT}; v.u.f = f; return v; }

const jstr *jstr_new(jarena *a, const char *s, size_t n); /* NULL on OOM */
int jv_str(jarena *a, const char *s, size_t n, jv *out); /* 0 or -1 (OOM) */
jlist *jlist_new(jarena *a, size_t cap);
int jlist_push(jarena *a, jlist *l, jv v);
jdict *jdict_new(jarena *a, size_t cap);
int jdict_set(jarena *a, jdict *d, jv k, jv v);
jv *jdict_get(const jdict *d, jv k);
jv *jdict_get_str(const jdict *d, const char *k, size_t n);
int jv_from_json(jarena *a, const json_t *j, jv *out, int depth);

const char *jv_type_name(const jv *v); /* Python's name of the type, for error messages */
int jv_truthy(const jv *v);
int jv_equal(const jv *a, const jv *b);
/* Three-way Python comparison; -2 when the types do not order (TypeError). */
int jv_compare(const jv *a, const jv *b);
int jv_is_number(const jv *v); /* int, float or bool */
double jv_num(const jv *v);
/* str() and repr() appended to b; -1 on buffer overflow. */
int jv_to_str(jbuf *b, const jv *v);
int jv_repr(jbuf *b, const jv *v);
void jv_float_repr(char *out, size_t n, double f);
/* json.dumps(v, ensure_ascii=ea, indent=indent (<0: none), sort_keys=sk); -1 overflow, -2 type
 * not serializable (*bad set to the offending value). */
int jv_tojson(jbuf *b, const jv *v, int indent, int ensure_ascii, int sort_keys, int level,
              const jv **bad);

/* UTF-8 helpers over valid UTF-8. */
size_t ju_cplen(const char *s, size_t n);             /* code points */
size_t ju_next(const char *s, size_t n, size_t i);    /* byte offset after the code point at i */
int32_t ju_decode(const char *s, size_t n, size_t i); /* code point at byte i */
int ju_isspace(int32_t c);                            /* Python str.isspace() */
size_t ju_offset(const char *s, size_t n, size_t cp); /* byte offset of code point cp (clamped) */

/* ---- builtins (jinja_builtins.c) ---- */

int jinja_filter_id(const char *name, size_t n); /* -1 when unknown */
int jinja_test_id(const char *name, size_t n);
int jinja_global_id(const char *name, size_t n);
int jinja_method_id(const jv *self, const char *name, size_t n); /* -1: not a method of self */

/* Arguments of a call, already evaluated. */
typedef struct {
  jv *pos;
  size_t npos;
  const char **kwn;
  size_t *kwl;
  jv *kw;
  size_t nkw;
} jargs;

int jinja_apply_filter(jrender *r, int line, int id, jv in, const jargs *a, jv *out);
/* Binds positional then keyword arguments to named slots (NULL where not given). */
int jinja_bind_args(jrender *r, int line, const char *what, const jargs *a, const char *const *names, int n,
                    const jv **slots);
/* jinja2's attribute getter for map/join/sort: "a.b.0" walks items, integer parts as indices. */
int jinja_attr_get(jrender *r, int line, jv item, const jstr *attr, jv *out);
/* sort (0), dictsort (1), unique (2) and indent (3), in jinja_sort.c. */
int jinja_filter_sorting(jrender *r, int line, int which, jv in, const jargs *a, jv *out);
int jinja_apply_test(jrender *r, int line, int id, jv in, const jargs *a, int *out);
int jinja_call_global(jrender *r, int line, int id, const jargs *a, jv *out);
int jinja_call_method(jrender *r, int line, const jfunc *f, const jargs *a, jv *out);
/* The filter/test/method name of an id, for messages. */
const char *jinja_filter_name(int id);
const char *jinja_test_name(int id);

/* Evaluator entry points the builtins need (jinja_eval.c). */
int jinja_getattr(jrender *r, int line, jv obj, const char *name, size_t n, jv *out);
int jinja_getitem(jrender *r, int line, jv obj, jv key, jv *out);
int jinja_iterate(jrender *r, int line, jv v, jlist **out); /* materialized items of an iterable */
int jinja_undef_error(jrender *r, int line, const jv *v);

#endif
