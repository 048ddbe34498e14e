/* Unit tests of the chat-template engine: tojson against jansson's serializer on random values,
 * float repr round-trips on random doubles, error messages for unsupported constructs, and the
 * render limits (output size, steps, recursion) that keep hostile templates bounded. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template/jinja_internal.h"
#include "test_util.h"

/* Renders src over ctx (may be NULL); returns the status, *out malloc'ed on success. */
static int render(const char *src, json_t *ctx, char **out, ts_err *err) {
  jinja_template *t;
  *out = NULL;
  int rc = jinja_parse(&t, src, strlen(src), err);
  if (rc < 0) return rc;
  size_t len;
  rc = jinja_render(t, ctx, out, &len, err);
  jinja_free(t);
  return rc;
}

static void check_render(const char *src, json_t *ctx, const char *want) {
  char *out;
  ts_err err = {0};
  int rc = render(src, ctx, &out, &err);
  CHECK_MSG(rc == 0, "%s: %s", src, err.msg);
  if (rc == 0) CHECK_MSG(strcmp(out, want) == 0, "%s: got [%s] want [%s]", src, out, want);
  free(out);
}

static void check_error(const char *src, json_t *ctx, const char *want) {
  char *out;
  ts_err err = {0};
  int rc = render(src, ctx, &out, &err);
  CHECK_MSG(rc < 0, "%s: rendered [%s], want error containing [%s]", src, out ? out : "", want);
  if (rc < 0) CHECK_MSG(strstr(err.msg, want) != NULL, "%s: error [%s] lacks [%s]", src, err.msg, want);
  free(out);
}

/* ---- random JSON values ---- */

static void rand_utf8(test_rng *r, char *buf, size_t cap) {
  static const char *pieces[] = {"a", "Z", " ", "\"", "\\", "/", "\n", "\r", "\t", "\b", "\f", "\x01", "\x1f",
                                 "\x7f", "é", "日", "🎉", "\xe2\x80\xa8", "<", "&", "'", "0", "{}"};
  size_t n = test_rng_next(r) % 8, len = 0;
  buf[0] = 0;
  for (size_t i = 0; i < n; i++) {
    const char *p = pieces[test_rng_next(r) % (sizeof pieces / sizeof *pieces)];
    if (len + strlen(p) + 1 >= cap) break;
    memcpy(buf + len, p, strlen(p) + 1);
    len += strlen(p);
  }
}

static json_t *rand_value(test_rng *r, int depth) {
  char s[128];
  switch (test_rng_next(r) % (depth < 3 ? 7 : 5)) {
  case 0: return json_integer((json_int_t)(test_rng_next(r) % 2000001) - 1000000);
  case 1: return json_boolean(test_rng_next(r) % 2);
  case 2: return json_null();
  case 3:
  case 4: rand_utf8(r, s, sizeof s); return json_string(s);
  case 5: {
    json_t *a = json_array();
    for (int i = 0, n = (int)(test_rng_next(r) % 4); i < n; i++) json_array_append_new(a, rand_value(r, depth + 1));
    return a;
  }
  default: {
    json_t *o = json_object();
    for (int i = 0, n = (int)(test_rng_next(r) % 4); i < n; i++) {
      rand_utf8(r, s, sizeof s - 8);
      snprintf(s + strlen(s), 8, "%d", i); /* distinct keys */
      json_object_set_new(o, s, rand_value(r, depth + 1));
    }
    return o;
  }
  }
}

/* jansson writes \u escapes with upper-case hex, Python with lower-case; the random strings hold
 * no letter 'u' after a backslash, so every "\u" here is an escape. */
static void lower_u_escapes(char *s) {
  for (; s && *s; s++)
    if (s[0] == '\\' && s[1] == 'u')
      for (int k = 2; k < 6 && s[k]; k++)
        if (s[k] >= 'A' && s[k] <= 'F') s[k] = (char)(s[k] - 'A' + 'a');
}

/* jansson's default serializer uses Python's ", " and ": " separators, keeps key order and leaves
 * non-ASCII unescaped, so for values without floats it must agree with tojson byte for byte. */
static void test_tojson_matches_jansson(void) {
  test_rng r = {0xC0FFEE1234567ull};
  jinja_template *plain, *indented;
  ts_err err = {0};
  const char *p1 = "{{ x | tojson }}", *p2 = "{{ x | tojson(indent=2) }}";
  CHECK(jinja_parse(&plain, p1, strlen(p1), &err) == 0);
  CHECK(jinja_parse(&indented, p2, strlen(p2), &err) == 0);
  int distinct = 0;
  char *prev = NULL;
  for (int i = 0; i < 500; i++) {
    json_t *v = rand_value(&r, 0);
    json_t *ctx = json_pack("{s:O}", "x", v);
    char *want = json_dumps(v, JSON_ENCODE_ANY);
    char *want_ind = json_dumps(v, JSON_ENCODE_ANY | JSON_INDENT(2));
    lower_u_escapes(want);
    lower_u_escapes(want_ind);
    char *got = NULL, *got_ind = NULL;
    size_t len;
    CHECK(jinja_render(plain, ctx, &got, &len, &err) == 0);
    CHECK(jinja_render(indented, ctx, &got_ind, &len, &err) == 0);
    if (got && want) CHECK_MSG(strcmp(got, want) == 0, "tojson [%s] jansson [%s]", got, want);
    if (got_ind && want_ind) CHECK_MSG(strcmp(got_ind, want_ind) == 0, "tojson(indent=2) [%s] jansson [%s]", got_ind, want_ind);
    if (!prev || (got && strcmp(prev, got) != 0)) distinct++;
    free(prev);
    prev = got;
    free(got_ind);
    free(want);
    free(want_ind);
    json_decref(ctx);
    json_decref(v);
  }
  free(prev);
  CHECK_MSG(distinct > 300, "random values were not random: %d distinct", distinct);
  jinja_free(plain);
  jinja_free(indented);
}

/* Python's float repr: the shortest digits that round-trip. */
static void test_float_repr(void) {
  static const struct {
    double v;
    const char *want;
  } fixed[] = {{1.0, "1.0"}, {0.1, "0.1"}, {1e16, "1e+16"}, {1e15, "1000000000000000.0"}, {1e-5, "1e-05"},
               {0.0001, "0.0001"}, {-0.0, "-0.0"}, {1.5e300, "1.5e+300"}, {0.30000000000000004, "0.30000000000000004"},
               {123456789012345680.0, "1.2345678901234568e+17"}, {5e-324, "5e-324"}, {2.5, "2.5"}};
  char buf[64];
  for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++) {
    jv_float_repr(buf, sizeof buf, fixed[i].v);
    CHECK_MSG(strcmp(buf, fixed[i].want) == 0, "repr(%.17g) = %s, want %s", fixed[i].v, buf, fixed[i].want);
  }
  test_rng r = {0x1234ABCDull};
  for (int i = 0; i < 20000; i++) {
    uint64_t bits = test_rng_next(&r);
    double d;
    memcpy(&d, &bits, sizeof d);
    if (!isfinite(d)) continue;
    jv_float_repr(buf, sizeof buf, d);
    CHECK_MSG(strtod(buf, NULL) == d, "repr %s does not round-trip %.17g", buf, d);
    /* Shortest: one significant digit fewer must not round-trip. */
    char sig[64];
    int digits = 0;
    for (const char *p = buf; *p && *p != 'e'; p++)
      if (*p >= '0' && *p <= '9' && (digits || *p != '0')) sig[digits++] = *p;
    while (digits > 0 && sig[digits - 1] == '0') digits--;
    char shorter[64];
    if (digits > 1) {
      snprintf(shorter, sizeof shorter, "%.*e", digits - 2, d);
      CHECK_MSG(strtod(shorter, NULL) != d, "repr %s is not the shortest (%s)", buf, shorter);
    }
  }
}

static void test_errors(void) {
  json_t *ctx = json_pack("{s:[i]}", "x", 1);
  check_error("line one\n{{ x }}\n{{ x | wordwrap(4) }}", ctx, "unsupported filter 'wordwrap' at line 3");
  check_error("{% include 'a' %}", ctx, "unsupported tag 'include' at line 1");
  check_error("\n\n\n{% if x is shiny %}{% endif %}", ctx, "unsupported test 'shiny' at line 4");
  check_error("{% for a in x %}", ctx, "expected 'endfor'");
  check_error("{{ raise_exception('No tools for you') }}", ctx, "No tools for you");
  check_error("{{ x.y.z }}", ctx, "has no attribute 'y'");
  check_error("{{ nothing.attr }}", ctx, "'nothing' is undefined at line 1");
  check_error("\xff{{ 1 }}", ctx, "not valid UTF-8");
  check_error("{{ 'a' + 1 }}", ctx, "unsupported operand type(s) for +: 'str' and 'int'");
  json_decref(ctx);
}

static void test_basics(void) {
  json_t *ctx = json_pack("{s:[{s:s,s:s},{s:s,s:s}],s:b}", "messages", "role", "user", "content", "héllo",
                          "role", "assistant", "content", "<think>r</think>ok", "add_generation_prompt", 1);
  check_render("{% for m in messages %}{{ m.role }}:{{ m['content'] }}|{% endfor %}", ctx,
               "user:héllo|assistant:<think>r</think>ok|");
  check_render("{{ messages[-1].content.split('</think>')[-1] }}", ctx, "ok");
  check_render("{%- if add_generation_prompt %}\n  gen\n{%- endif %}\n", ctx, "  gen");
  check_render("{{ messages | length }}{{ messages[::-1][0].role }}", ctx, "2assistant");
  check_render("  {% if true %}\n  x\n  {% endif %}\n", NULL, "  x\n");
  check_render("{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 / 2 }} {{ 2 ** 10 }}", NULL, "3 -4 3.5 1024");
  json_decref(ctx);
}

static void test_limits(void) {
  jinja_template *t;
  ts_err err = {0};
  char *out = NULL;
  size_t len;
  jinja_limits lim = {.max_output = 1000, .max_memory = 1 << 24, .max_steps = 10000, .max_depth = 8};
  const char *big = "{% for i in range(100000) %}xxxxxxxxxx{% endfor %}";
  CHECK(jinja_parse(&t, big, strlen(big), &err) == 0);
  CHECK(jinja_render_limited(t, NULL, &lim, &out, &len, &err) < 0);
  CHECK_MSG(strstr(err.msg, "limit") || strstr(err.msg, "steps"), "%s", err.msg);
  jinja_free(t);
  const char *rec = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
  CHECK(jinja_parse(&t, rec, strlen(rec), &err) == 0);
  CHECK(jinja_render_limited(t, NULL, &lim, &out, &len, &err) < 0);
  CHECK_MSG(strstr(err.msg, "nested deeper") != NULL, "%s", err.msg);
  jinja_free(t);
  /* A value nested in itself many times must fail cleanly when printed, not overflow the stack. */
  const char *nest = "{% set ns = namespace(l=[]) %}{% for i in range(3000) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l }}";
  jinja_limits roomy = {.max_output = 1 << 20, .max_memory = 1 << 26, .max_steps = 1000000, .max_depth = 8};
  CHECK(jinja_parse(&t, nest, strlen(nest), &err) == 0);
  CHECK(jinja_render_limited(t, NULL, &roomy, &out, &len, &err) < 0);
  jinja_free(t);
  /* Long chains parse into deep trees; evaluation must refuse rather than recurse without bound. */
  size_t n = 200000;
  char *chain = malloc(n * 2 + 16);
  strcpy(chain, "{{ 1");
  for (size_t i = 0; i < n; i++) strcat(chain + 4 + 2 * i, "+1");
  strcat(chain, " }}");
  int rc = jinja_parse(&t, chain, strlen(chain), &err);
  if (rc == 0) {
    rc = jinja_render_limited(t, NULL, &roomy, &out, &len, &err);
    free(out);
    jinja_free(t);
  }
  CHECK_MSG(rc < 0 && strstr(err.msg, "nested too deeply"), "chain of %zu additions: %s", n, err.msg);
  free(chain);
}

int main(void) {
  test_basics();
  test_errors();
  test_tojson_matches_jansson();
  test_float_repr();
  test_limits();
  return test_finish("test_jinja");
}
