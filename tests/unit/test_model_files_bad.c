/* Bad model files give one clear error line, never a crash: configs with missing, mistyped or
 * unsupported fields; truncated and corrupted safetensors and GGUF; missing tensors, wrong shapes
 * and unsupported dtypes. Files are rewritten from the shared stories260K model into a temporary
 * directory; F16/BF16 and sharded rewrites must load and match the original. */
#include <dirent.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/gguf.h"
#include "model/model_files.h"
#include "model/safetensors.h"
#include "test_util.h"

static char g_dir[1024];
static test_rng g_rng = {0x0ddba11cafef00dull};

static void write_file(const char *name, const void *data, size_t n) {
  char p[2048];
  snprintf(p, sizeof p, "%s/%s", g_dir, name);
  FILE *f = fopen(p, "wb");
  CHECK_MSG(f != NULL, "cannot write %s", p);
  if (!f) return;
  if (n) fwrite(data, 1, n, f);
  fclose(f);
}

static uint8_t *read_all(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long sz = ftell(f);
  fseek(f, 0, SEEK_SET);
  uint8_t *b = malloc((size_t)sz + 1);
  *n = fread(b, 1, (size_t)sz, f);
  fclose(f);
  return b;
}

static void clear_dir(void) {
  DIR *d = opendir(g_dir);
  if (!d) return;
  struct dirent *e;
  char p[2048];
  while ((e = readdir(d)))
    if (e->d_name[0] != '.') {
      snprintf(p, sizeof p, "%s/%s", g_dir, e->d_name);
      unlink(p);
    }
  closedir(d);
}

/* One tensor to write: header fields plus its bytes. */
typedef struct {
  char name[128];
  char dtype[16];
  int ndim;
  int64_t shape[4];
  const void *data;
  size_t nbytes;
} out_tensor;

static void write_st(const char *fname, const out_tensor *t, int n) {
  json_t *h = json_object();
  size_t off = 0;
  for (int i = 0; i < n; i++) {
    json_t *shape = json_array();
    for (int k = 0; k < t[i].ndim; k++) json_array_append_new(shape, json_integer(t[i].shape[k]));
    json_object_set_new(h, t[i].name,
                        json_pack("{s:s, s:o, s:[I, I]}", "dtype", t[i].dtype, "shape", shape,
                                  "data_offsets", (json_int_t)off,
                                  (json_int_t)(off + t[i].nbytes)));
    off += t[i].nbytes;
  }
  char *hs0 = json_dumps(h, JSON_COMPACT);
  /* Pad the header with spaces to a multiple of 8 as the format's writers do (aligned data). */
  size_t hl = (strlen(hs0) + 7) / 8 * 8, total = 8 + hl + off;
  char *hs = malloc(hl + 1);
  memset(hs, ' ', hl);
  memcpy(hs, hs0, strlen(hs0));
  free(hs0);
  uint8_t *buf = malloc(total);
  for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)hl >> (8 * i));
  memcpy(buf + 8, hs, hl);
  off = 8 + hl;
  for (int i = 0; i < n; i++) {
    memcpy(buf + off, t[i].data, t[i].nbytes);
    off += t[i].nbytes;
  }
  write_file(fname, buf, total);
  free(buf);
  free(hs);
  json_decref(h);
}

/* The stories260K tensors as out_tensor entries (views into the opened file). */
static int base_tensors(const st_file *f, out_tensor *t) {
  for (int i = 0; i < f->n_tensors; i++) {
    const st_tensor *s = &f->tensors[i];
    memset(&t[i], 0, sizeof t[i]);
    snprintf(t[i].name, sizeof t[i].name, "%s", s->name);
    snprintf(t[i].dtype, sizeof t[i].dtype, "%s", s->dtype_name);
    t[i].ndim = s->ndim;
    memcpy(t[i].shape, s->shape, sizeof s->shape);
    t[i].data = s->data;
    t[i].nbytes = (size_t)(s->end - s->begin);
  }
  return f->n_tensors;
}

static int find_out(out_tensor *t, int n, const char *name) {
  for (int i = 0; i < n; i++)
    if (!strcmp(t[i].name, name)) return i;
  return -1;
}

/* Opens g_dir and loads the full shard; returns the status, err holds the line. */
static int try_load(ts_err *err) {
  model_files *mf = NULL;
  ts_err_clear(err);
  int rc = model_files_open(&mf, g_dir, err);
  if (rc == TS_OK) {
    model_shard s = model_shard_default(model_files_config(mf), 0, 1, 0, 1);
    model_weights w;
    rc = model_files_load_weights(mf, &s, &w, err);
    if (rc == TS_OK) model_weights_free(&w);
    model_files_close(mf);
  }
  CHECK(rc == TS_OK || (err->msg[0] && !strchr(err->msg, '\n')));
  return rc;
}

static void expect_error(const char *want) {
  ts_err err;
  int rc = try_load(&err);
  CHECK_MSG(rc < 0 && strstr(err.msg, want), "want '%s', got rc=%d '%s'", want, rc, err.msg);
}

static void put_config(json_t *cfg) {
  char *s = json_dumps(cfg, JSON_INDENT(1));
  write_file("config.json", s, strlen(s));
  free(s);
}

static void test_configs(const char *src, out_tensor *t, int n) {
  char p[2048];
  snprintf(p, sizeof p, "%s/config.json", src);
  json_error_t je;
  json_t *base = json_load_file(p, 0, &je);
  CHECK(base != NULL);
  if (!base) return;
  clear_dir();
  write_st("model.safetensors", t, n);
  put_config(base);
  ts_err err;
  CHECK_MSG(try_load(&err) == TS_OK, "%s", err.msg);

  json_t *c = json_deep_copy(base);
  json_object_del(c, "hidden_size");
  put_config(c);
  expect_error("config.json: missing field 'hidden_size'");
  json_decref(c);

  c = json_deep_copy(base);
  json_object_set_new(c, "num_hidden_layers", json_string("5"));
  put_config(c);
  expect_error("config.json: field 'num_hidden_layers' must be an integer");
  json_decref(c);

  c = json_deep_copy(base);
  json_object_set_new(c, "architectures", json_pack("[s]", "GPT2LMHeadModel"));
  put_config(c);
  expect_error("config.json: unsupported architecture 'GPT2LMHeadModel'");
  json_decref(c);

  c = json_deep_copy(base);
  json_object_set_new(c, "rope_scaling", json_pack("{s:s, s:f}", "type", "yarn", "factor", 4.0));
  put_config(c);
  expect_error("unsupported rope_scaling type 'yarn'");
  json_decref(c);

  c = json_deep_copy(base);
  json_object_set_new(c, "num_key_value_heads", json_integer(3));
  put_config(c);
  expect_error("not a multiple of num_key_value_heads");
  json_decref(c);

  /* A config that disagrees with the weights: the shape check names file and tensor. */
  c = json_deep_copy(base);
  json_object_set_new(c, "intermediate_size", json_integer(173));
  put_config(c);
  expect_error("model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
               "[172, 64], expected [173, 64]");
  json_decref(c);

  /* Untied config without lm_head.weight. */
  c = json_deep_copy(base);
  json_object_set_new(c, "tie_word_embeddings", json_false());
  put_config(c);
  expect_error("model.safetensors: missing tensor 'lm_head.weight'");
  json_decref(c);

  write_file("config.json", "{\"architectures\": [", 19);
  expect_error("config.json: not valid JSON");

  /* Every field deleted in turn, and every field replaced by a random wrong-typed value: each
   * either still loads (optional field) or fails with a line that starts with config.json. */
  const char *key;
  json_t *v;
  json_object_foreach(base, key, v) {
    for (int variant = 0; variant < 2; variant++) {
      c = json_deep_copy(base);
      if (variant == 0) json_object_del(c, key);
      else {
        uint64_t r = test_rng_next(&g_rng) % 4;
        json_object_set_new(c, key, r == 0   ? json_string("x")
                                    : r == 1 ? json_real(-1.5)
                                    : r == 2 ? json_pack("[i]", 1)
                                             : json_integer(-7));
      }
      put_config(c);
      int rc = try_load(&err);
      CHECK_MSG(rc == TS_OK || strstr(err.msg, "config.json") || strstr(err.msg, "model.safet"),
                "key %s: %s", key, err.msg);
      json_decref(c);
    }
  }
  put_config(base);
  json_decref(base);
}

static void test_tensors(out_tensor *t, int n) {
  const char *up = "model.layers.3.mlp.up_proj.weight";
  int iu = find_out(t, n, up);
  CHECK(iu >= 0);
  if (iu < 0) return;
  out_tensor saved = t[iu];

  /* missing */
  out_tensor *fewer = malloc(sizeof *fewer * (size_t)n);
  int m = 0;
  for (int i = 0; i < n; i++)
    if (i != iu) fewer[m++] = t[i];
  write_st("model.safetensors", fewer, m);
  expect_error("model.safetensors: missing tensor 'model.layers.3.mlp.up_proj.weight'");
  free(fewer);

  /* wrong shape (consistent byte count) */
  t[iu].shape[0] = 171;
  t[iu].nbytes = 171 * 64 * 4;
  write_st("model.safetensors", t, n);
  expect_error("model.safetensors: tensor 'model.layers.3.mlp.up_proj.weight' has shape [171, 64], "
               "expected [172, 64]");
  t[iu] = saved;

  /* unsupported dtypes */
  snprintf(t[iu].dtype, sizeof t[iu].dtype, "F64");
  t[iu].shape[0] = 86;
  write_st("model.safetensors", t, n);
  expect_error("model.safetensors: tensor 'model.layers.3.mlp.up_proj.weight' has unsupported "
               "dtype F64");
  t[iu] = saved;
  snprintf(t[iu].dtype, sizeof t[iu].dtype, "I32");
  write_st("model.safetensors", t, n);
  expect_error("tensor 'model.layers.3.mlp.up_proj.weight' has unsupported dtype I32");
  snprintf(t[iu].dtype, sizeof t[iu].dtype, "Q9_X");
  write_st("model.safetensors", t, n);
  expect_error("tensor 'model.layers.3.mlp.up_proj.weight' has unsupported dtype Q9_X");
  t[iu] = saved;

  /* Byte count that disagrees with dtype x shape. */
  t[iu].nbytes -= 4;
  write_st("model.safetensors", t, n);
  expect_error("model.safetensors: tensor 'model.layers.3.mlp.up_proj.weight': 44028 data bytes");
  t[iu] = saved;
  write_st("model.safetensors", t, n);
}

static void test_truncation_and_corruption(void) {
  char p[2048];
  snprintf(p, sizeof p, "%s/model.safetensors", g_dir);
  size_t n;
  uint8_t *buf = read_all(p, &n);
  CHECK(buf != NULL);
  if (!buf) return;
  ts_err err;
  for (int i = 0; i < 24; i++) {
    size_t cut = (size_t)(test_rng_next(&g_rng) % n);
    if (i == 0) cut = 5;
    write_file("model.safetensors", buf, cut);
    int rc = try_load(&err);
    CHECK_MSG(rc < 0 && strstr(err.msg, "model.safetensors"), "cut %zu: %s", cut, err.msg);
  }
  /* Random byte flips in the header: must not crash; failures name the file. */
  uint64_t hl = 0;
  memcpy(&hl, buf, 8);
  int failed = 0;
  for (int i = 0; i < 64; i++) {
    uint8_t *c = malloc(n);
    memcpy(c, buf, n);
    size_t at = 8 + (size_t)(test_rng_next(&g_rng) % hl);
    c[at] ^= (uint8_t)(1 + test_rng_next(&g_rng) % 255);
    write_file("model.safetensors", c, n);
    if (try_load(&err) < 0) {
      failed++;
      CHECK_MSG(strstr(err.msg, "model.safetensors") != NULL, "%s", err.msg);
    }
    free(c);
  }
  CHECK(failed > 32);
  /* A header length past the end. */
  uint8_t *c = malloc(n);
  memcpy(c, buf, n);
  c[6] = 0x7f;
  write_file("model.safetensors", c, n);
  expect_error("model.safetensors: header length");
  free(c);
  write_file("model.safetensors", buf, n);
  free(buf);
}

/* F16/BF16 rewrites load and match the f32 originals to rounding; a two-file index loads too. */
static void test_half_and_sharded(out_tensor *t, int n, const model_weights *ref) {
  for (int kind = 0; kind < 2; kind++) {
    out_tensor *h = malloc(sizeof *h * (size_t)n);
    uint16_t **bufs = calloc((size_t)n, sizeof *bufs);
    for (int i = 0; i < n; i++) {
      h[i] = t[i];
      size_t ne = t[i].nbytes / 4;
      bufs[i] = malloc(ne * 2);
      const float *src = t[i].data;
      for (size_t k = 0; k < ne; k++) {
        float x;
        memcpy(&x, src + k, 4);
        bufs[i][k] = kind ? ts_f32_to_bf16(x) : ts_f32_to_f16(x);
      }
      snprintf(h[i].dtype, sizeof h[i].dtype, "%s", kind ? "BF16" : "F16");
      h[i].data = bufs[i];
      h[i].nbytes = ne * 2;
    }
    write_st("model.safetensors", h, n);
    model_files *mf = NULL;
    ts_err err;
    CHECK_MSG(model_files_open(&mf, g_dir, &err) == TS_OK, "%s", err.msg);
    if (mf) {
      model_shard s = model_shard_default(model_files_config(mf), 0, 2, 0, 1);
      model_weights w;
      CHECK_MSG(model_files_load_weights(mf, &s, &w, &err) == TS_OK, "%s", err.msg);
      const ts_tensor *a = &w.layers[2].wo, *b = &ref->layers[2].wo;
      CHECK(a->dtype == (kind ? TS_BF16 : TS_F16) && a->shape[1] == 32 && a->row_stride == 64);
      for (int r = 0; r < 64; r++)
        for (int col = 0; col < 32; col++) {
          uint16_t hv = ((const uint16_t *)a->data)[r * 64 + col];
          float x = kind ? ts_bf16_to_f32(hv) : ts_f16_to_f32(hv);
          float y = ((const float *)b->data)[r * 64 + col];
          CHECK(fabsf(x - y) <= fabsf(y) * (kind ? 1.0f / 256 : 1.0f / 2048) + 1e-7f);
        }
      model_weights_free(&w);
      model_files_close(mf);
    }
    for (int i = 0; i < n; i++) free(bufs[i]);
    free(bufs);
    free(h);
  }

  /* Two shards: even tensors in one file, odd in the other, and an index naming them. */
  out_tensor *a = malloc(sizeof *a * (size_t)n), *b = malloc(sizeof *b * (size_t)n);
  int na = 0, nb = 0;
  json_t *wm = json_object();
  for (int i = 0; i < n; i++) {
    const char *f = i % 2 ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
    if (i % 2) b[nb++] = t[i];
    else a[na++] = t[i];
    json_object_set_new(wm, t[i].name, json_string(f));
  }
  clear_dir();
  write_st("model-00001-of-00002.safetensors", a, na);
  write_st("model-00002-of-00002.safetensors", b, nb);
  json_t *idx = json_pack("{s:{s:i}, s:o}", "metadata", "total_size", 0, "weight_map", wm);
  char *s = json_dumps(idx, 0);
  write_file("model.safetensors.index.json", s, strlen(s));
  free(s);
  json_decref(idx);
  free(a);
  free(b);
}

static void test_index_errors(const char *src) {
  char p[2048];
  snprintf(p, sizeof p, "%s/config.json", src);
  size_t n;
  uint8_t *cfg = read_all(p, &n);
  write_file("config.json", cfg, n);
  free(cfg);
  model_files *mf = NULL;
  ts_err err;
  CHECK_MSG(model_files_open(&mf, g_dir, &err) == TS_OK, "%s", err.msg);
  if (mf) {
    model_shard s = model_shard_default(model_files_config(mf), 0, 1, 0, 1);
    model_weights w;
    int rc = model_files_load_weights(mf, &s, &w, &err);
    CHECK_MSG(rc == TS_OK, "%s", err.msg);
    if (rc == TS_OK) model_weights_free(&w);
    model_files_close(mf);
  }
  const char *bad1 = "{\"weight_map\": {\"model.norm.weight\": \"../model.safetensors\"}}";
  write_file("model.safetensors.index.json", bad1, strlen(bad1));
  expect_error("is not a plain file name");
  const char *bad2 = "{\"weight_map\": {\"model.bogus.weight\": \"model-00001-of-00002.safetensors\"}}";
  write_file("model.safetensors.index.json", bad2, strlen(bad2));
  expect_error("model.safetensors.index.json: tensor 'model.bogus.weight' is listed in "
               "model-00001-of-00002.safetensors but that file lacks it");
  const char *bad3 = "{\"weight_map\": {\"x\": \"model-00003-of-00002.safetensors\"}}";
  write_file("model.safetensors.index.json", bad3, strlen(bad3));
  expect_error("model-00003-of-00002.safetensors: cannot open");
}

static void test_gguf(const char *path) {
  size_t n;
  uint8_t *buf = read_all(path, &n);
  CHECK(buf != NULL);
  if (!buf) return;
  ts_err err;
  gguf_file *g = NULL;
  CHECK_MSG(gguf_parse(&g, buf, n, "x.gguf", &err) == TS_OK, "%s", err.msg);
  gguf_close(g);
  /* Every truncation fails with the file's name; no crash. */
  for (int i = 0; i < 48; i++) {
    size_t cut = i < 8 ? (size_t)(test_rng_next(&g_rng) % 4096) : (size_t)(test_rng_next(&g_rng) % n);
    uint8_t *c = malloc(cut ? cut : 1);
    memcpy(c, buf, cut);
    int rc = gguf_parse(&g, c, cut, "x.gguf", &err);
    CHECK_MSG(rc < 0 && !strncmp(err.msg, "x.gguf: ", 8), "cut %zu: rc %d %s", cut, rc, err.msg);
    if (rc == TS_OK) gguf_close(g);
    free(c);
  }
  /* Random byte flips in the metadata and tensor table: no crash, failures name the file. */
  for (int i = 0; i < 200; i++) {
    uint8_t *c = malloc(n);
    memcpy(c, buf, n);
    for (int k = 0; k < 3; k++) c[test_rng_next(&g_rng) % 8192] ^= (uint8_t)(1 + test_rng_next(&g_rng) % 255);
    int rc = gguf_parse(&g, c, n, "x.gguf", &err);
    if (rc == TS_OK) gguf_close(g);
    else CHECK_MSG(!strncmp(err.msg, "x.gguf: ", 8), "%s", err.msg);
    free(c);
  }
  uint8_t *c = malloc(n);
  memcpy(c, buf, n);
  c[0] = 'X';
  CHECK(gguf_parse(&g, c, n, "x.gguf", &err) == TS_EFORMAT && strstr(err.msg, "not a GGUF file"));
  memcpy(c, buf, n);
  c[4] = 1;
  CHECK(gguf_parse(&g, c, n, "x.gguf", &err) == TS_EUNSUPPORTED &&
        strstr(err.msg, "GGUF version 1 is not supported"));
  free(c);
  /* Through model_files_open: a truncated file on disk. */
  write_file("cut.gguf", buf, n - 100);
  char p[2048];
  snprintf(p, sizeof p, "%s/cut.gguf", g_dir);
  model_files *mf = NULL;
  CHECK(model_files_open(&mf, p, &err) == TS_EFORMAT);
  CHECK_MSG(strstr(err.msg, "cut.gguf: tensor") && strstr(err.msg, "past the end"), "%s", err.msg);
  free(buf);
}

int main(void) {
  snprintf(g_dir, sizeof g_dir, "%s/tmp-model-files-bad-%d", TESSERA_BINARY_DIR, (int)getpid());
  mkdir(g_dir, 0755);
  char src[1024], p[2048];
  snprintf(src, sizeof src, "%s/models/stories260K-hf", test_shared_dir());
  snprintf(p, sizeof p, "%s/model.safetensors", src);
  ts_err err;
  st_file *f = NULL;
  CHECK_MSG(st_open(&f, p, &err) == TS_OK, "%s", err.msg);
  model_files *ref = NULL;
  CHECK_MSG(model_files_open(&ref, src, &err) == TS_OK, "%s", err.msg);
  if (!f || !ref) return test_finish("test_model_files_bad");
  model_shard full = model_shard_default(model_files_config(ref), 0, 1, 0, 1);
  model_weights rw;
  CHECK(model_files_load_weights(ref, &full, &rw, &err) == TS_OK);
  out_tensor *t = calloc((size_t)f->n_tensors, sizeof *t);
  int n = base_tensors(f, t);

  clear_dir();
  expect_error("no config.json");
  test_configs(src, t, n);
  test_tensors(t, n);
  test_truncation_and_corruption();
  test_half_and_sharded(t, n, &rw);
  test_index_errors(src);
  snprintf(p, sizeof p, "%s/models/stories260K/stories260K.gguf", test_shared_dir());
  test_gguf(p);

  clear_dir();
  rmdir(g_dir);
  free(t);
  model_weights_free(&rw);
  model_files_close(ref);
  st_close(f);
  return test_finish("test_model_files_bad");
}
