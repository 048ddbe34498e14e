/* safetensors header parser: random tensor tables (names, dtypes, shapes) written by jansson and
 * read back field for field; byte ranges checked against dtype x shape and the file size; the
 * look-up by name; and malformed headers refused with the file's name. */
#include <jansson.h>
#include <string.h>

#include "model/safetensors.h"
#include "test_util.h"

static const struct {
  const char *name;
  int bytes;
  ts_dtype dt;
} dts[] = {{"F32", 4, TS_F32}, {"F16", 2, TS_F16}, {"BF16", 2, TS_BF16},
           {"I64", 8, ST_DTYPE_UNSUPPORTED}, {"U8", 1, ST_DTYPE_UNSUPPORTED},
           {"F8_E4M3", 1, ST_DTYPE_UNSUPPORTED}};

static uint8_t *build(json_t *h, size_t data_bytes, size_t *n) {
  char *s = json_dumps(h, JSON_COMPACT);
  size_t hl = strlen(s);
  *n = 8 + hl + data_bytes;
  uint8_t *b = calloc(1, *n);
  for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)hl >> (8 * i));
  memcpy(b + 8, s, hl);
  free(s);
  return b;
}

static int parse_fails_with(const uint8_t *b, size_t n, const char *want) {
  st_file *f = NULL;
  ts_err err;
  int rc = st_parse(&f, b, n, "x.safetensors", &err);
  st_close(f);
  if (rc == TS_OK) return 0;
  if (strncmp(err.msg, "x.safetensors: ", 15) || !strstr(err.msg, want)) {
    fprintf(stderr, "got '%s', want '%s'\n", err.msg, want);
    return 0;
  }
  return 1;
}

int main(void) {
  test_rng rng = {0xabad1deaull};
  int distinct_shapes = 0;
  int64_t prev = -1;
  for (int iter = 0; iter < 300; iter++) {
    int nt = (int)(test_rng_next(&rng) % 20);
    json_t *h = json_object();
    json_object_set_new(h, "__metadata__", json_pack("{s:s}", "format", "pt"));
    int64_t shapes[20][4];
    int ndims[20], kinds[20];
    uint64_t offs[20];
    size_t off = 0;
    char names[20][32];
    for (int i = 0; i < nt; i++) {
      snprintf(names[i], sizeof names[i], "t%llu.%d", (unsigned long long)(test_rng_next(&rng) % 1000), i);
      kinds[i] = (int)(test_rng_next(&rng) % 6);
      ndims[i] = (int)(test_rng_next(&rng) % 5);
      json_t *shape = json_array();
      int64_t ne = 1;
      for (int k = 0; k < ndims[i]; k++) {
        shapes[i][k] = (int64_t)(test_rng_next(&rng) % 7);
        ne *= shapes[i][k];
        json_array_append_new(shape, json_integer(shapes[i][k]));
      }
      if (ne != prev) distinct_shapes++;
      prev = ne;
      offs[i] = off;
      size_t nb = (size_t)ne * (size_t)dts[kinds[i]].bytes;
      json_object_set_new(h, names[i], json_pack("{s:s, s:o, s:[I, I]}", "dtype", dts[kinds[i]].name,
                                                 "shape", shape, "data_offsets", (json_int_t)off,
                                                 (json_int_t)(off + nb)));
      off += nb;
    }
    size_t n;
    uint8_t *b = build(h, off, &n);
    st_file *f = NULL;
    ts_err err;
    int rc = st_parse(&f, b, n, "x.safetensors", &err);
    CHECK_MSG(rc == TS_OK, "%s", err.msg);
    if (rc == TS_OK) {
      CHECK(f->n_tensors == nt);
      for (int i = 0; i < nt; i++) {
        const st_tensor *t = st_find(f, names[i]);
        CHECK(t != NULL);
        if (!t) continue;
        CHECK(t->dtype == dts[kinds[i]].dt && !strcmp(t->dtype_name, dts[kinds[i]].name));
        CHECK(t->ndim == ndims[i] && t->begin == offs[i]);
        for (int k = 0; k < ndims[i]; k++) CHECK(t->shape[k] == shapes[i][k]);
        CHECK((const uint8_t *)t->data == b + (n - off) + offs[i]);
      }
      CHECK(st_find(f, "absent") == NULL);
      for (int i = 1; i < f->n_tensors; i++) CHECK(strcmp(f->tensors[i - 1].name, f->tensors[i].name) < 0);
      st_close(f);
    }
    /* One byte short, or a tensor whose range disagrees with dtype x shape: refused. */
    if (off > 0) CHECK(parse_fails_with(b, n - 1, "outside"));
    free(b);
    if (nt > 0) {
      json_t *t0 = json_object_get(h, names[0]);
      json_t *o = json_object_get(t0, "data_offsets");
      json_array_set_new(o, 1, json_integer(json_integer_value(json_array_get(o, 1)) + 1));
      b = build(h, off + 1, &n);
      CHECK(parse_fails_with(b, n, "data bytes"));
      free(b);
    }
    json_decref(h);
  }
  CHECK(distinct_shapes > 100);

  /* Malformed headers. */
  const char *bad[][2] = {
      {"[1,2]", "not a JSON object"},
      {"{\"a\": 1}", "header entry is not an object"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2]}}", "needs dtype, shape and data_offsets"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [-2], \"data_offsets\": [0, 0]}}", "shape entries"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1], \"data_offsets\": [0, 4]}}",
       "5 dimensions"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}", "outside"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, 4294967296], "
       "\"data_offsets\": [0, 0]}}", "overflows"},
      {"{\"a\": {}, \"a\": {}}", "not valid JSON"},
      {"{\"a\"", "not valid JSON"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    size_t hl = strlen(bad[i][0]), n = 8 + hl + 16;
    uint8_t *b = calloc(1, n);
    for (int k = 0; k < 8; k++) b[k] = (uint8_t)((uint64_t)hl >> (8 * k));
    memcpy(b + 8, bad[i][0], hl);
    CHECK_MSG(parse_fails_with(b, n, bad[i][1]), "case %zu", i);
    free(b);
  }
  uint8_t tiny[7] = {0};
  CHECK(parse_fails_with(tiny, sizeof tiny, "truncated"));
  uint8_t huge[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f};
  CHECK(parse_fails_with(huge, sizeof huge, "header length"));
  st_file *f = NULL;
  ts_err err;
  CHECK(st_open(&f, "/nonexistent/model.safetensors", &err) == TS_EIO);
  CHECK(strstr(err.msg, "/nonexistent/model.safetensors: cannot open") != NULL);
  return test_finish("test_safetensors");
}
