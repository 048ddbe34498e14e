/* tessera tokenize: encode text to token ids (JSON array), decode ids to text, or encode a file of
 * JSON lines in bulk. */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "hub/hub.h"
#include "tokenizer/tokenizer.h"

static void usage(FILE *f) {
  fprintf(f,
          "usage: tessera tokenize MODEL (--text TEXT | --decode IDS | --jsonl FILE) [options]\n\n"
          "MODEL is a directory with tokenizer.json, a .gguf file or a Hugging Face hub id.\n\n"
          "  --text TEXT        print the ids of TEXT as a JSON array\n"
          "  --decode IDS       print the text of comma-separated ids (e.g. 1,2,3)\n"
          "  --jsonl FILE       encode each line of FILE ('-' = stdin): a JSON string, or a JSON\n"
          "                     array of byte values 0..255 for raw bytes; prints one JSON array of\n"
          "                     ids per line (with --decode-jsonl: lines are id arrays, prints JSON\n"
          "                     strings)\n"
          "  --decode-jsonl     see --jsonl\n"
          "  --no-special       add no BOS/EOS (special tokens written in the text still match)\n"
          "  --skip-special     when decoding, drop special tokens\n"
          "  --no-parse-special treat special tokens written in the text as plain text\n"
          "  --revision REV     hub revision (default main)\n"
          "  -h, --help         show this help\n");
}

static int print_ids(const int32_t *ids, size_t n) {
  putchar('[');
  for (size_t i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
  putchar(']');
  putchar('\n');
  return 0;
}

static int encode_one(const tokenizer *t, const char *s, size_t n, int flags) {
  int32_t *ids;
  size_t n_ids;
  ts_err err = {0};
  if (tok_encode(t, s, n, flags, &ids, &n_ids, &err)) {
    fprintf(stderr, "tessera tokenize: %s\n", err.msg);
    return 1;
  }
  print_ids(ids, n_ids);
  free(ids);
  return 0;
}

/* Writes text as a JSON string; invalid UTF-8 cannot occur (decode output is always valid). */
static void print_json_string(const char *s, size_t n) {
  json_t *j = json_stringn_nocheck(s, n);
  char *out = j ? json_dumps(j, JSON_ENCODE_ANY) : NULL;
  puts(out ? out : "null");
  free(out);
  json_decref(j);
}

static int run_jsonl(const tokenizer *t, const char *file, int flags, int decode, int skip) {
  FILE *f = strcmp(file, "-") ? fopen(file, "rb") : stdin;
  if (!f) {
    fprintf(stderr, "tessera tokenize: %s: %s\n", file, strerror(errno));
    return 1;
  }
  char *line = NULL;
  size_t cap = 0;
  ssize_t len;
  long lineno = 0;
  int rc = 0;
  while (!rc && (len = getline(&line, &cap, f)) >= 0) {
    lineno++;
    json_error_t je;
    json_t *j = json_loadb(line, (size_t)len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
    if (!j) {
      fprintf(stderr, "tessera tokenize: %s:%ld: invalid JSON: %s\n", file, lineno, je.text);
      rc = 1;
      break;
    }
    if (json_is_string(j) && !decode) {
      rc = encode_one(t, json_string_value(j), json_string_length(j), flags);
    } else if (json_is_array(j)) {
      size_t n = json_array_size(j), i;
      char *bytes = malloc(n + 1);
      int32_t *ids = malloc((n + 1) * sizeof *ids);
      json_t *x;
      json_array_foreach(j, i, x) {
        json_int_t v = json_integer_value(x);
        if (!json_is_integer(x) || (!decode && (v < 0 || v > 255)) || v < INT32_MIN || v > INT32_MAX) {
          fprintf(stderr, "tessera tokenize: %s:%ld: element %zu is not a %s\n", file, lineno, i,
                  decode ? "token id" : "byte value");
          rc = 1;
          break;
        }
        if (bytes) bytes[i] = (char)v;
        if (ids) ids[i] = (int32_t)v;
      }
      if (!rc && (!bytes || !ids)) {
        fprintf(stderr, "tessera tokenize: out of memory\n");
        rc = 1;
      }
      if (!rc && !decode) rc = encode_one(t, bytes, n, flags);
      if (!rc && decode) {
        char *text;
        size_t tl;
        ts_err err = {0};
        if (tok_decode(t, ids, n, skip, &text, &tl, &err)) {
          fprintf(stderr, "tessera tokenize: %s\n", err.msg);
          rc = 1;
        } else {
          print_json_string(text, tl);
          free(text);
        }
      }
      free(bytes);
      free(ids);
    } else {
      fprintf(stderr, "tessera tokenize: %s:%ld: expected a JSON %s\n", file, lineno,
              decode ? "array of ids" : "string or array of bytes");
      rc = 1;
    }
    json_decref(j);
    fflush(stdout);
  }
  free(line);
  if (f != stdin) fclose(f);
  return rc;
}

static int run_decode(const tokenizer *t, const char *list, int skip) {
  size_t n = 0, cap = 16;
  int32_t *ids = malloc(cap * sizeof *ids);
  const char *p = list;
  while (ids && *p) {
    char *end;
    errno = 0;
    long v = strtol(p, &end, 10);
    if (end == p || errno || v < INT32_MIN || v > INT32_MAX || (*end && *end != ',')) {
      fprintf(stderr, "tessera tokenize: --decode: '%s' is not a comma-separated list of ids\n", list);
      free(ids);
      return 1;
    }
    if (n == cap) {
      int32_t *q = realloc(ids, (cap *= 2) * sizeof *ids);
      if (!q) break;
      ids = q;
    }
    ids[n++] = (int32_t)v;
    p = *end ? end + 1 : end;
  }
  if (!ids) {
    fprintf(stderr, "tessera tokenize: out of memory\n");
    return 1;
  }
  char *text;
  size_t len;
  ts_err err = {0};
  int rc = tok_decode(t, ids, n, skip, &text, &len, &err);
  free(ids);
  if (rc) {
    fprintf(stderr, "tessera tokenize: %s\n", err.msg);
    return 1;
  }
  fwrite(text, 1, len, stdout);
  putchar('\n');
  free(text);
  return 0;
}

int cmd_tokenize(int argc, char **argv) {
  const char *model = NULL, *text = NULL, *decode = NULL, *jsonl = NULL, *revision = NULL;
  int no_special = 0, skip = 0, decode_jsonl = 0, no_parse = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    int has_val = i + 1 < argc;
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(a, "--text") && has_val) text = argv[++i];
    else if (!strcmp(a, "--decode") && has_val) decode = argv[++i];
    else if (!strcmp(a, "--jsonl") && has_val) jsonl = argv[++i];
    else if (!strcmp(a, "--revision") && has_val) revision = argv[++i];
    else if (!strcmp(a, "--no-special")) no_special = 1;
    else if (!strcmp(a, "--skip-special")) skip = 1;
    else if (!strcmp(a, "--no-parse-special")) no_parse = 1;
    else if (!strcmp(a, "--decode-jsonl")) decode_jsonl = 1;
    else if (a[0] == '-' && a[1]) {
      fprintf(stderr, "tessera tokenize: unknown or incomplete option '%s'\n", a);
      usage(stderr);
      return 1;
    } else if (!model) model = a;
    else {
      fprintf(stderr, "tessera tokenize: unexpected argument '%s'\n", a);
      return 1;
    }
  }
  if (!model || (!!text + !!decode + !!jsonl) != 1) {
    fprintf(stderr, "tessera tokenize: need MODEL and exactly one of --text, --decode, --jsonl\n");
    usage(stderr);
    return 1;
  }
  char path[PATH_MAX];
  ts_err err = {0};
  hub_options opt = {.revision = revision, .progress = 1};
  if (hub_resolve(model, &opt, path, sizeof path, &err)) {
    fprintf(stderr, "tessera tokenize: %s\n", err.msg);
    return 1;
  }
  tokenizer *t;
  if (tok_load_path(&t, path, &err)) {
    fprintf(stderr, "tessera tokenize: %s\n", err.msg);
    return 1;
  }
  int flags = (no_parse ? 0 : TOK_PARSE_SPECIAL) | (no_special ? 0 : TOK_ADD_SPECIAL);
  int rc;
  if (text) rc = encode_one(t, text, strlen(text), flags);
  else if (decode) rc = run_decode(t, decode, skip);
  else rc = run_jsonl(t, jsonl, flags, decode_jsonl, skip);
  tok_free(t);
  return rc;
}
