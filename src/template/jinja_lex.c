/* Jinja lexer: template source to tokens, with jinja2's whitespace rules as Hugging Face
 * transformers configures them (trim_blocks, lstrip_blocks, no trailing newline kept). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "template/jinja_internal.h"

typedef struct {
  jarena *a;
  const char *s; /* normalized source */
  size_t n;
  size_t pos;
  int line;
  int line_starting; /* the last thing consumed ended with a newline */
  jtoks *out;
  ts_err *err;
  char bal[256]; /* expected closing brackets */
  int nbal;
} lexer;

static int lx_push(lexer *L, jtok t) {
  if (L->out->n == L->out->cap) {
    size_t cap = L->out->cap ? L->out->cap * 2 : 256;
    jtok *v = realloc(L->out->v, cap * sizeof *v);
    if (!v) return ts_errorf(L->err, TS_ENOMEM, "out of memory while lexing template");
    L->out->v = v;
    L->out->cap = cap;
  }
  L->out->v[L->out->n++] = t;
  return 0;
}

static void lx_advance(lexer *L, size_t to) {
  for (size_t i = L->pos; i < to; i++)
    if (L->s[i] == '\n') L->line++;
  L->pos = to;
}

/* Skips Python whitespace (\s) from pos; returns the new offset. */
static size_t skip_ws(const char *s, size_t n, size_t i) {
  while (i < n) {
    int32_t c = ju_decode(s, n, i);
    if (!ju_isspace(c)) break;
    i = ju_next(s, n, i);
  }
  return i;
}

/* Length of text once trailing Python whitespace is removed. */
static size_t rstrip_len(const char *s, size_t n) {
  size_t end = 0, i = 0;
  while (i < n) {
    size_t nx = ju_next(s, n, i);
    if (!ju_isspace(ju_decode(s, n, i))) end = nx;
    i = nx;
  }
  return end;
}

/* Emits text [from, to) as data after applying the strip sign of the tag that follows it. */
static int lx_data(lexer *L, size_t from, size_t to, char sign, int is_var) {
  size_t len = to - from;
  const char *t = L->s + from;
  if (sign == '-') {
    len = rstrip_len(t, len);
  } else if (sign != '+' && !is_var) {
    /* lstrip_blocks: drop spaces between the line start and a block or comment tag. */
    size_t l = len;
    while (l > 0 && t[l - 1] != '\n') l--;
    if ((l > 0 || L->line_starting) && l < len && skip_ws(t, len, l) == len) len = l;
  }
  if (len == 0) return 0;
  jtok k = {.type = JT_DATA, .line = L->line, .s = t, .len = len};
  return lx_push(L, k);
}

static int lx_err(lexer *L, const char *msg) {
  return ts_errorf(L->err, TS_EFORMAT, "%s at line %d", msg, L->line);
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Decodes a string literal body with Python's unicode-escape rules. */
static int lx_string(lexer *L, size_t from, size_t to, int line) {
  char *o = jarena_alloc(L->a, to - from + 1);
  if (!o) return ts_errorf(L->err, TS_ENOMEM, "out of memory while lexing template");
  size_t k = 0;
  for (size_t i = from; i < to;) {
    char c = L->s[i];
    if (c != '\\' || i + 1 >= to) {
      o[k++] = c;
      i++;
      continue;
    }
    char e = L->s[i + 1];
    int32_t cp = -1;
    size_t used = 2;
    switch (e) {
    case '\n': i += 2; continue;
    case '\\': cp = '\\'; break;
    case '\'': cp = '\''; break;
    case '"': cp = '"'; break;
    case 'a': cp = 7; break;
    case 'b': cp = 8; break;
    case 'f': cp = 12; break;
    case 'n': cp = 10; break;
    case 'r': cp = 13; break;
    case 't': cp = 9; break;
    case 'v': cp = 11; break;
    case 'x': case 'u': case 'U': {
      int nd = e == 'x' ? 2 : e == 'u' ? 4 : 8;
      if (i + 2 + (size_t)nd > to) return ts_errorf(L->err, TS_EFORMAT, "truncated \\%c escape in string at line %d", e, line);
      uint32_t v = 0;
      for (int d = 0; d < nd; d++) {
        int h = hexval(L->s[i + 2 + d]);
        if (h < 0) return ts_errorf(L->err, TS_EFORMAT, "truncated \\%c escape in string at line %d", e, line);
        v = v * 16 + (uint32_t)h;
      }
      if (v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        return ts_errorf(L->err, TS_EFORMAT, "invalid \\%c escape in string at line %d", e, line);
      cp = (int32_t)v;
      used = 2 + (size_t)nd;
      break;
    }
    case 'N':
      return ts_errorf(L->err, TS_EUNSUPPORTED, "unsupported \\N{...} escape in string at line %d", line);
    default:
      if (e >= '0' && e <= '7') {
        int v = 0, d = 0;
        while (d < 3 && i + 1 + d < to && L->s[i + 1 + d] >= '0' && L->s[i + 1 + d] <= '7') {
          v = v * 8 + (L->s[i + 1 + d] - '0');
          d++;
        }
        cp = v;
        used = 1 + (size_t)d;
      }
      break;
    }
    if (cp < 0) { /* unknown escape: Python keeps the backslash */
      o[k++] = c;
      i++;
      continue;
    }
    k += (size_t)utf8proc_encode_char(cp, (utf8proc_uint8_t *)o + k);
    i += used;
  }
  o[k] = 0;
  jtok t = {.type = JT_STRING, .line = line, .s = o, .len = k};
  return lx_push(L, t);
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }
static int is_name0(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }

/* Digits with single underscores between them, from i; returns the end (== i when none). */
static size_t digits(const char *s, size_t n, size_t i, int base) {
  size_t j = i;
  for (;;) {
    size_t k = j;
    while (k < n && (base == 16 ? hexval(s[k]) >= 0 : (s[k] >= '0' && s[k] < '0' + base))) k++;
    if (k == j) return j == i ? i : j - 1; /* trailing underscore is not part of the number */
    j = k;
    if (j + 1 < n && s[j] == '_') j++;
    else return j;
  }
}

static int lx_number(lexer *L) {
  const char *s = L->s;
  size_t n = L->n, i = L->pos, end;
  int base = 10;
  char buf[128];
  size_t k = 0;
  if (s[i] == '0' && i + 1 < n && strchr("xXoObB", s[i + 1]) && s[i + 1]) {
    base = (s[i + 1] == 'x' || s[i + 1] == 'X') ? 16 : (s[i + 1] == 'o' || s[i + 1] == 'O') ? 8 : 2;
    size_t st = i + 2;
    if (st < n && s[st] == '_') st++;
    end = digits(s, n, st, base);
    if (end == st) return lx_err(L, "invalid integer literal");
    for (size_t j = st; j < end && k < sizeof buf - 1; j++)
      if (s[j] != '_') buf[k++] = s[j];
    buf[k] = 0;
    errno = 0;
    unsigned long long v = strtoull(buf, NULL, base);
    if (errno || v > INT64_MAX || end - st > 100) return lx_err(L, "integer literal too large");
    jtok t = {.type = JT_INT, .line = L->line, .s = s + i, .len = end - i, .i = (int64_t)v};
    lx_advance(L, end);
    return lx_push(L, t);
  }
  end = digits(s, n, i, 10);
  int is_float = 0;
  size_t e = end;
  if (e + 1 < n && s[e] == '.' && is_digit(s[e + 1])) {
    e = digits(s, n, e + 1, 10);
    is_float = 1;
  }
  if (e < n && (s[e] == 'e' || s[e] == 'E')) {
    size_t x = e + 1;
    if (x < n && (s[x] == '+' || s[x] == '-')) x++;
    size_t xe = digits(s, n, x, 10);
    if (xe > x) {
      e = xe;
      is_float = 1;
    }
  }
  if (!is_float) e = end;
  if (e - i > 100) return lx_err(L, "number literal too long");
  for (size_t j = i; j < e; j++)
    if (s[j] != '_') buf[k++] = s[j];
  buf[k] = 0;
  jtok t = {.line = L->line, .s = s + i, .len = e - i};
  if (is_float) {
    t.type = JT_FLOAT;
    t.f = strtod(buf, NULL);
  } else {
    errno = 0;
    unsigned long long v = strtoull(buf, NULL, 10);
    if (errno || v > INT64_MAX) return lx_err(L, "integer literal too large");
    t.type = JT_INT;
    t.i = (int64_t)v;
  }
  lx_advance(L, e);
  return lx_push(L, t);
}

/* Tokens inside {{ }} or {% %} up to and including the end delimiter. */
static int lx_tag(lexer *L, int is_var) {
  const char *s = L->s;
  size_t n = L->n;
  L->nbal = 0;
  for (;;) {
    size_t w = skip_ws(s, n, L->pos);
    if (w > L->pos) {
      lx_advance(L, w);
      L->line_starting = s[w - 1] == '\n';
    }
    size_t i = L->pos;
    if (i >= n) return lx_err(L, is_var ? "unexpected end of template, expected '}}'" : "unexpected end of template, expected '%}'");
    if (L->nbal == 0) {
      char c2 = is_var ? '}' : '%';
      int dash = s[i] == '-', plus = s[i] == '+' && !is_var;
      size_t d = i + (size_t)(dash || plus);
      if (d + 1 < n && s[d] == c2 && s[d + 1] == '}') {
        jtok t = {.type = is_var ? JT_VAR_END : JT_BLOCK_END, .line = L->line};
        TS_TRY(lx_push(L, t));
        size_t end = d + 2;
        if (dash) end = skip_ws(s, n, end);
        else if (!plus && !is_var && end < n && s[end] == '\n') end++;
        lx_advance(L, end);
        L->line_starting = end > 0 && s[end - 1] == '\n';
        return 0;
      }
    }
    char c = s[i];
    if (is_name0(c)) {
      size_t j = i + 1;
      while (j < n && (is_name0(s[j]) || is_digit(s[j]))) j++;
      jtok t = {.type = JT_NAME, .line = L->line, .s = s + i, .len = j - i};
      TS_TRY(lx_push(L, t));
      lx_advance(L, j);
    } else if (is_digit(c)) {
      TS_TRY(lx_number(L));
    } else if (c == '\'' || c == '"') {
      size_t j = i + 1;
      while (j < n && s[j] != c) j += (s[j] == '\\' && j + 1 < n) ? 2 : 1;
      if (j >= n) return lx_err(L, "unterminated string literal");
      int line = L->line;
      TS_TRY(lx_string(L, i + 1, j, line));
      lx_advance(L, j + 1);
    } else {
      static const char *ops2[] = {"//", "**", "==", "!=", "<=", ">="};
      size_t len = 0;
      for (size_t k = 0; k < sizeof ops2 / sizeof *ops2; k++)
        if (i + 1 < n && s[i] == ops2[k][0] && s[i + 1] == ops2[k][1]) len = 2;
      if (!len && c && strchr("+-/*%~[](){}<>=.:|,;", c)) len = 1;
      if (!len) {
        int32_t cp = ju_decode(s, n, i);
        return ts_errorf(L->err, TS_EFORMAT, "unexpected character U+%04X in tag at line %d", (unsigned)cp, L->line);
      }
      if (len == 1 && (c == '(' || c == '[' || c == '{')) {
        if (L->nbal >= (int)sizeof L->bal) return lx_err(L, "brackets nested too deeply");
        L->bal[L->nbal++] = c == '(' ? ')' : c == '[' ? ']' : '}';
      } else if (len == 1 && (c == ')' || c == ']' || c == '}')) {
        if (L->nbal == 0 || L->bal[L->nbal - 1] != c)
          return ts_errorf(L->err, TS_EFORMAT, "unexpected '%c' at line %d", c, L->line);
        L->nbal--;
      }
      jtok t = {.type = JT_OP, .line = L->line, .s = s + i, .len = len};
      TS_TRY(lx_push(L, t));
      lx_advance(L, i + len);
    }
    L->line_starting = 0;
  }
}

/* Matches "{%[-+]? raw [-]?%}" style openers: returns the end of the tag or 0. */
static size_t match_word_tag(const char *s, size_t n, size_t i, const char *word, char *sign, int *dash_end,
                             int *plus_end) {
  if (i + 2 > n || s[i] != '{' || s[i + 1] != '%') return 0;
  size_t j = i + 2;
  *sign = 0;
  if (j < n && (s[j] == '-' || s[j] == '+')) *sign = s[j++];
  j = skip_ws(s, n, j);
  size_t wl = strlen(word);
  if (j + wl > n || memcmp(s + j, word, wl) != 0) return 0;
  j += wl;
  size_t k = skip_ws(s, n, j);
  if (k == j && k < n && (is_name0(s[k]) || is_digit(s[k]))) return 0;
  j = k;
  *dash_end = *plus_end = 0;
  if (j < n && s[j] == '-') { *dash_end = 1; j++; }
  else if (j < n && s[j] == '+') { *plus_end = 1; j++; }
  if (j + 2 > n || s[j] != '%' || s[j + 1] != '}') return 0;
  return j + 2;
}

static int lx_root(lexer *L) {
  const char *s = L->s;
  size_t n = L->n;
  while (L->pos < n) {
    size_t i = L->pos, t = i;
    while (t + 1 < n && !(s[t] == '{' && (s[t + 1] == '{' || s[t + 1] == '%' || s[t + 1] == '#'))) t++;
    if (t + 1 >= n) { /* only data left */
      jtok k = {.type = JT_DATA, .line = L->line, .s = s + i, .len = n - i};
      TS_TRY(lx_push(L, k));
      lx_advance(L, n);
      return 0;
    }
    char kind = s[t + 1];
    char sign = (t + 2 < n && (s[t + 2] == '-' || s[t + 2] == '+')) ? s[t + 2] : 0;
    char rsign;
    int rdash, rplus;
    size_t raw_end = kind == '%' ? match_word_tag(s, n, t, "raw", &rsign, &rdash, &rplus) : 0;
    if (raw_end && rplus) raw_end = 0; /* "+%}" does not close a raw opener */
    TS_TRY(lx_data(L, i, t, sign, kind == '{'));
    lx_advance(L, t);
    L->line_starting = 0;
    if (raw_end) {
      size_t body = raw_end;
      if (rdash) body = skip_ws(s, n, body);
      /* The body runs to the first {% endraw %}. */
      size_t j = body, close = 0;
      char esign = 0;
      int edash = 0, eplus = 0;
      for (; j + 1 < n; j++)
        if (s[j] == '{' && s[j + 1] == '%' && (close = match_word_tag(s, n, j, "endraw", &esign, &edash, &eplus))) break;
      if (!close) return lx_err(L, "missing end of raw directive");
      lx_advance(L, body);
      L->line_starting = body > 0 && s[body - 1] == '\n';
      TS_TRY(lx_data(L, body, j, esign, 0));
      if (edash) close = skip_ws(s, n, close);
      else if (!eplus && close < n && s[close] == '\n') close++;
      lx_advance(L, close);
      L->line_starting = close > 0 && s[close - 1] == '\n';
      continue;
    }
    size_t after = t + 2 + (sign ? 1 : 0);
    if (kind == '#') {
      size_t j = after;
      while (j + 1 < n && !(s[j] == '#' && s[j + 1] == '}')) j++;
      if (j + 1 >= n) return lx_err(L, "missing end of comment tag");
      size_t end = j + 2;
      char es = j > after ? s[j - 1] : 0;
      if (es == '-') end = skip_ws(s, n, end);
      else if (es != '+' && end < n && s[end] == '\n') end++;
      lx_advance(L, end);
      L->line_starting = s[end - 1] == '\n';
      continue;
    }
    jtok k = {.type = kind == '{' ? JT_VAR_BEGIN : JT_BLOCK_BEGIN, .line = L->line};
    TS_TRY(lx_push(L, k));
    lx_advance(L, after);
    TS_TRY(lx_tag(L, kind == '{'));
  }
  return 0;
}

int jinja_lex(jarena *a, const char *src, size_t len, jtoks *out, ts_err *err) {
  /* Valid UTF-8 only: Python would not have decoded anything else into a template string. */
  for (size_t i = 0; i < len;) {
    utf8proc_int32_t cp;
    utf8proc_ssize_t r = utf8proc_iterate((const utf8proc_uint8_t *)src + i, (utf8proc_ssize_t)(len - i), &cp);
    if (r <= 0) return ts_errorf(err, TS_EFORMAT, "template is not valid UTF-8 (byte offset %zu)", i);
    i += (size_t)r;
  }
  char *s = jarena_alloc(a, len + 1);
  if (!s) return ts_errorf(err, TS_ENOMEM, "out of memory while lexing template");
  size_t n = 0;
  for (size_t i = 0; i < len; i++) {
    if (src[i] == '\r') {
      s[n++] = '\n';
      if (i + 1 < len && src[i + 1] == '\n') i++;
    } else {
      s[n++] = src[i];
    }
  }
  if (n > 0 && s[n - 1] == '\n') n--; /* keep_trailing_newline=False */
  s[n] = 0;
  lexer L = {.a = a, .s = s, .n = n, .line = 1, .line_starting = 1, .out = out, .err = err};
  TS_TRY(lx_root(&L));
  jtok e = {.type = JT_EOF, .line = L.line};
  return lx_push(&L, e);
}
