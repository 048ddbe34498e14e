/* GGUF v2/v3 parsing over a read-only mapping: a cursor that refuses to step past the end, the
 * metadata table (values read in place), and the tensor table with each tensor's byte range
 * checked against the file. Assumes a little-endian host, as GGUF files are little-endian. */
#include "model/gguf.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/mapfile.h"

#define GGUF_MAGIC 0x46554747u /* "GGUF" little-endian */
#define GGUF_MAX_ARRAY_DEPTH 4
#define GGUF_MAX_ALIGNMENT (1u << 20)

typedef struct {
  uint32_t id;
  ts_dtype dtype; /* TS_DTYPE_COUNT: known size, but tessera does not compute with it */
  int blck, bytes;
} ggml_type_desc;

/* ggml type ids as in ggml.h; sizes let every tensor's byte range be checked. */
static const ggml_type_desc ggml_types[] = {
    {0, TS_F32, 1, 4},           {1, TS_F16, 1, 2},           {2, TS_Q4_0, 32, 18},
    {3, TS_DTYPE_COUNT, 32, 20}, {6, TS_DTYPE_COUNT, 32, 22}, {7, TS_DTYPE_COUNT, 32, 24},
    {8, TS_Q8_0, 32, 34},        {9, TS_DTYPE_COUNT, 32, 36}, {10, TS_DTYPE_COUNT, 256, 84},
    {11, TS_DTYPE_COUNT, 256, 110}, {12, TS_Q4_K, 256, 144}, {13, TS_DTYPE_COUNT, 256, 176},
    {14, TS_Q6_K, 256, 210},     {15, TS_DTYPE_COUNT, 256, 292}, {24, TS_DTYPE_COUNT, 1, 1},
    {25, TS_DTYPE_COUNT, 1, 2},  {26, TS_I32, 1, 4},          {27, TS_DTYPE_COUNT, 1, 8},
    {28, TS_DTYPE_COUNT, 1, 8},  {30, TS_BF16, 1, 2},
};

static const ggml_type_desc *ggml_type_lookup(uint32_t id) {
  for (size_t i = 0; i < sizeof ggml_types / sizeof ggml_types[0]; i++)
    if (ggml_types[i].id == id) return &ggml_types[i];
  return NULL;
}

static const int gguf_scalar_size[GGUF_TYPE_COUNT] = {
    [GGUF_TYPE_UINT8] = 1,  [GGUF_TYPE_INT8] = 1,    [GGUF_TYPE_UINT16] = 2, [GGUF_TYPE_INT16] = 2,
    [GGUF_TYPE_UINT32] = 4, [GGUF_TYPE_INT32] = 4,   [GGUF_TYPE_FLOAT32] = 4, [GGUF_TYPE_BOOL] = 1,
    [GGUF_TYPE_STRING] = 0, [GGUF_TYPE_ARRAY] = 0,   [GGUF_TYPE_UINT64] = 8, [GGUF_TYPE_INT64] = 8,
    [GGUF_TYPE_FLOAT64] = 8,
};

typedef struct {
  const uint8_t *buf;
  size_t size, pos;
  const char *fn;
  ts_err *err;
} gguf_cursor;

static int cur_need(gguf_cursor *c, uint64_t n, const char *what) {
  if (n > c->size - c->pos)
    return ts_errorf(c->err, TS_EFORMAT, "%s: truncated %s at byte %zu", c->fn, what, c->pos);
  return TS_OK;
}

static int cur_u32(gguf_cursor *c, uint32_t *v, const char *what) {
  TS_TRY(cur_need(c, 4, what));
  memcpy(v, c->buf + c->pos, 4);
  c->pos += 4;
  return TS_OK;
}

static int cur_u64(gguf_cursor *c, uint64_t *v, const char *what) {
  TS_TRY(cur_need(c, 8, what));
  memcpy(v, c->buf + c->pos, 8);
  c->pos += 8;
  return TS_OK;
}

static int cur_str(gguf_cursor *c, gguf_str *s, const char *what) {
  uint64_t len;
  TS_TRY(cur_u64(c, &len, what));
  TS_TRY(cur_need(c, len, what));
  s->ptr = (const char *)c->buf + c->pos;
  s->len = len;
  c->pos += (size_t)len;
  return TS_OK;
}

static char *str_dup(gguf_str s) {
  char *p = malloc((size_t)s.len + 1);
  if (p) {
    memcpy(p, s.ptr, (size_t)s.len);
    p[s.len] = '\0';
  }
  return p;
}

/* Steps over one value of type t (arrays recursively, to a bounded depth). */
static int cur_skip_value(gguf_cursor *c, uint32_t t, int depth, const char *key) {
  if (t >= GGUF_TYPE_COUNT)
    return ts_errorf(c->err, TS_EFORMAT, "%s: metadata '%s' has unknown type %u", c->fn, key, t);
  if (t == GGUF_TYPE_STRING) {
    gguf_str s;
    return cur_str(c, &s, "metadata string");
  }
  if (t != GGUF_TYPE_ARRAY) {
    TS_TRY(cur_need(c, (uint64_t)gguf_scalar_size[t], "metadata value"));
    c->pos += (size_t)gguf_scalar_size[t];
    return TS_OK;
  }
  if (depth >= GGUF_MAX_ARRAY_DEPTH)
    return ts_errorf(c->err, TS_EFORMAT, "%s: metadata '%s' nests arrays too deeply", c->fn, key);
  uint32_t et;
  uint64_t n;
  TS_TRY(cur_u32(c, &et, "metadata array"));
  TS_TRY(cur_u64(c, &n, "metadata array"));
  if (et >= GGUF_TYPE_COUNT)
    return ts_errorf(c->err, TS_EFORMAT, "%s: metadata '%s' has unknown element type %u", c->fn,
                     key, et);
  if (et != GGUF_TYPE_STRING && et != GGUF_TYPE_ARRAY) {
    uint64_t bytes;
    if (__builtin_mul_overflow(n, (uint64_t)gguf_scalar_size[et], &bytes))
      return ts_errorf(c->err, TS_EFORMAT, "%s: metadata '%s' array too long", c->fn, key);
    TS_TRY(cur_need(c, bytes, "metadata array"));
    c->pos += (size_t)bytes;
    return TS_OK;
  }
  /* Each string or array element takes at least 8 bytes: a cheap early bound on n. */
  if (n > (c->size - c->pos) / 8) return cur_need(c, c->size - c->pos + 1, "metadata array");
  for (uint64_t i = 0; i < n; i++) TS_TRY(cur_skip_value(c, et, depth + 1, key));
  return TS_OK;
}

static int gguf_read_kv(gguf_cursor *c, gguf_kv *kv) {
  gguf_str key;
  TS_TRY(cur_str(c, &key, "metadata key"));
  if (!(kv->key = str_dup(key))) return ts_errorf(c->err, TS_ENOMEM, "%s: out of memory", c->fn);
  uint32_t t;
  TS_TRY(cur_u32(c, &t, "metadata type"));
  if (t >= GGUF_TYPE_COUNT)
    return ts_errorf(c->err, TS_EFORMAT, "%s: metadata '%s' has unknown type %u", c->fn, kv->key, t);
  kv->type = (gguf_type)t;
  const uint8_t *p = c->buf + c->pos;
  if (t == GGUF_TYPE_ARRAY) {
    size_t start = c->pos;
    uint32_t et;
    TS_TRY(cur_u32(c, &et, "metadata array"));
    TS_TRY(cur_u64(c, &kv->arr_len, "metadata array"));
    kv->arr_type = et < GGUF_TYPE_COUNT ? (gguf_type)et : GGUF_TYPE_COUNT;
    kv->arr_data = c->buf + c->pos;
    c->pos = start;
    return cur_skip_value(c, t, 0, kv->key);
  }
  if (t == GGUF_TYPE_STRING) return cur_str(c, &kv->v.str, "metadata string");
  TS_TRY(cur_need(c, (uint64_t)gguf_scalar_size[t], "metadata value"));
  switch (kv->type) {
    case GGUF_TYPE_UINT8: kv->v.u64 = p[0]; break;
    case GGUF_TYPE_INT8: kv->v.i64 = (int8_t)p[0]; break;
    case GGUF_TYPE_BOOL: kv->v.b = p[0] != 0; break;
    case GGUF_TYPE_UINT16: { uint16_t x; memcpy(&x, p, 2); kv->v.u64 = x; break; }
    case GGUF_TYPE_INT16: { int16_t x; memcpy(&x, p, 2); kv->v.i64 = x; break; }
    case GGUF_TYPE_UINT32: { uint32_t x; memcpy(&x, p, 4); kv->v.u64 = x; break; }
    case GGUF_TYPE_INT32: { int32_t x; memcpy(&x, p, 4); kv->v.i64 = x; break; }
    case GGUF_TYPE_FLOAT32: { float x; memcpy(&x, p, 4); kv->v.f64 = x; break; }
    case GGUF_TYPE_UINT64: memcpy(&kv->v.u64, p, 8); break;
    case GGUF_TYPE_INT64: memcpy(&kv->v.i64, p, 8); break;
    case GGUF_TYPE_FLOAT64: memcpy(&kv->v.f64, p, 8); break;
    default: break;
  }
  c->pos += (size_t)gguf_scalar_size[t];
  return TS_OK;
}

static int gguf_read_tensor_info(gguf_cursor *c, gguf_tensor *t) {
  gguf_str name;
  TS_TRY(cur_str(c, &name, "tensor table"));
  if (!(t->name = str_dup(name))) return ts_errorf(c->err, TS_ENOMEM, "%s: out of memory", c->fn);
  uint32_t nd;
  TS_TRY(cur_u32(c, &nd, "tensor table"));
  if (nd < 1 || nd > 4)
    return ts_errorf(c->err, TS_EFORMAT, "%s: tensor '%s' has %u dimensions (1..4)", c->fn,
                     t->name, nd);
  t->ndim = (int)nd;
  for (int i = 0; i < 4; i++) t->ne[i] = 1;
  for (uint32_t i = 0; i < nd; i++) {
    uint64_t ne;
    TS_TRY(cur_u64(c, &ne, "tensor table"));
    if (ne > ((uint64_t)1 << 40))
      return ts_errorf(c->err, TS_EFORMAT, "%s: tensor '%s' dimension %u is out of range", c->fn,
                       t->name, i);
    t->ne[i] = (int64_t)ne;
  }
  TS_TRY(cur_u32(c, &t->ggml_type, "tensor table"));
  TS_TRY(cur_u64(c, &t->offset, "tensor table"));
  return TS_OK;
}

void gguf_close(gguf_file *g) {
  if (!g) return;
  if (g->kv)
    for (uint64_t i = 0; i < g->n_kv; i++) free(g->kv[i].key);
  if (g->tensors)
    for (uint64_t i = 0; i < g->n_tensors; i++) free(g->tensors[i].name);
  free(g->kv);
  free(g->tensors);
  if (g->mapped) ts_unmap_file(g->map, g->size);
  free(g->path);
  free(g);
}

/* Checks a tensor's type, block alignment and byte range once the data section is known. */
static int gguf_place_tensor(gguf_file *g, gguf_tensor *t, ts_err *err) {
  const ggml_type_desc *d = ggml_type_lookup(t->ggml_type);
  if (t->offset % g->alignment)
    return ts_errorf(err, TS_EFORMAT, "%s: tensor '%s' offset %llu is not aligned to %llu",
                     g->path, t->name, (unsigned long long)t->offset,
                     (unsigned long long)g->alignment);
  uint64_t avail = g->size - g->data_offset;
  if (t->offset > avail)
    return ts_errorf(err, TS_EFORMAT, "%s: tensor '%s' starts past the end of the file", g->path,
                     t->name);
  t->data = g->map + g->data_offset + t->offset;
  if (!d) { /* a type this reader does not know: keep it, but it cannot be loaded */
    t->dtype = TS_DTYPE_COUNT;
    t->nbytes = 0;
    return TS_OK;
  }
  t->dtype = d->dtype;
  if (t->ne[0] % d->blck)
    return ts_errorf(err, TS_EFORMAT, "%s: tensor '%s' row of %lld is not a multiple of its block "
                     "size %d", g->path, t->name, (long long)t->ne[0], d->blck);
  uint64_t n = 1;
  for (int i = 0; i < 4; i++)
    if (__builtin_mul_overflow(n, (uint64_t)t->ne[i], &n))
      return ts_errorf(err, TS_EFORMAT, "%s: tensor '%s' shape overflows", g->path, t->name);
  uint64_t bytes;
  if (__builtin_mul_overflow(n / (uint64_t)d->blck, (uint64_t)d->bytes, &bytes) ||
      bytes > avail - t->offset)
    return ts_errorf(err, TS_EFORMAT, "%s: tensor '%s' data runs past the end of the file "
                     "(truncated?)", g->path, t->name);
  t->nbytes = bytes;
  return TS_OK;
}

int gguf_parse(gguf_file **out, const uint8_t *buf, size_t size, const char *name, ts_err *err) {
  *out = NULL;
  const char *fn = name ? name : "gguf";
  gguf_cursor c = {buf, size, 0, fn, err};
  uint32_t magic, version;
  TS_TRY(cur_u32(&c, &magic, "header"));
  if (magic != GGUF_MAGIC) return ts_errorf(err, TS_EFORMAT, "%s: not a GGUF file (bad magic)", fn);
  TS_TRY(cur_u32(&c, &version, "header"));
  if (version != 2 && version != 3)
    return ts_errorf(err, TS_EUNSUPPORTED, "%s: GGUF version %u is not supported (2 or 3)", fn,
                     version);
  gguf_file *g = calloc(1, sizeof *g);
  if (!g || !(g->path = strdup(fn))) {
    free(g);
    return ts_errorf(err, TS_ENOMEM, "%s: out of memory", fn);
  }
  g->map = buf;
  g->size = size;
  g->version = version;
  g->alignment = 32;
  int rc;
  uint64_t n_tensors, n_kv;
  if ((rc = cur_u64(&c, &n_tensors, "header")) < 0 || (rc = cur_u64(&c, &n_kv, "header")) < 0)
    goto fail;
  /* A key/value takes at least 12 bytes and a tensor-table entry at least 28: bound the counts by
   * the file size before allocating. */
  if (n_kv > (size - c.pos) / 12 || n_tensors > (size - c.pos) / 28) {
    rc = ts_errorf(err, TS_EFORMAT, "%s: %llu metadata entries and %llu tensors cannot fit in %zu "
                   "bytes (truncated?)", fn, (unsigned long long)n_kv,
                   (unsigned long long)n_tensors, size);
    goto fail;
  }
  g->kv = calloc(n_kv ? n_kv : 1, sizeof *g->kv);
  g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *g->tensors);
  if (!g->kv || !g->tensors) {
    rc = ts_errorf(err, TS_ENOMEM, "%s: out of memory", fn);
    goto fail;
  }
  for (uint64_t i = 0; i < n_kv; i++) {
    g->n_kv = i + 1;
    if ((rc = gguf_read_kv(&c, &g->kv[i])) < 0) goto fail;
  }
  for (uint64_t i = 0; i < n_tensors; i++) {
    g->n_tensors = i + 1;
    if ((rc = gguf_read_tensor_info(&c, &g->tensors[i])) < 0) goto fail;
    for (uint64_t j = 0; j < i; j++)
      if (!strcmp(g->tensors[j].name, g->tensors[i].name)) {
        rc = ts_errorf(err, TS_EFORMAT, "%s: tensor '%s' appears twice", fn, g->tensors[i].name);
        goto fail;
      }
  }
  const gguf_kv *al = gguf_find_kv(g, "general.alignment");
  if (al) {
    uint64_t a;
    if (gguf_get_u64(g, "general.alignment", &a) < 0 || a == 0 || (a & (a - 1)) ||
        a > GGUF_MAX_ALIGNMENT) {
      rc = ts_errorf(err, TS_EFORMAT, "%s: general.alignment must be a power of two <= %u", fn,
                     GGUF_MAX_ALIGNMENT);
      goto fail;
    }
    g->alignment = a;
  }
  g->data_offset = (c.pos + g->alignment - 1) / g->alignment * g->alignment;
  if (g->data_offset > size) {
    if (n_tensors) {
      rc = ts_errorf(err, TS_EFORMAT, "%s: truncated before the tensor data", fn);
      goto fail;
    }
    g->data_offset = size;
  }
  for (uint64_t i = 0; i < n_tensors; i++)
    if ((rc = gguf_place_tensor(g, &g->tensors[i], err)) < 0) goto fail;
  *out = g;
  return TS_OK;
fail:
  gguf_close(g);
  return rc;
}

int gguf_open(gguf_file **out, const char *path, ts_err *err) {
  *out = NULL;
  const void *map;
  size_t size;
  TS_TRY(ts_map_file(path, 24, "no header", &map, &size, err));
  int rc = gguf_parse(out, map, size, path, err);
  if (rc < 0) {
    ts_unmap_file(map, size);
    return rc;
  }
  (*out)->mapped = 1;
  return TS_OK;
}

const gguf_kv *gguf_find_kv(const gguf_file *g, const char *key) {
  for (uint64_t i = 0; i < g->n_kv; i++)
    if (!strcmp(g->kv[i].key, key)) return &g->kv[i];
  return NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *g, const char *name) {
  for (uint64_t i = 0; i < g->n_tensors; i++)
    if (!strcmp(g->tensors[i].name, name)) return &g->tensors[i];
  return NULL;
}

int gguf_get_u64(const gguf_file *g, const char *key, uint64_t *out) {
  const gguf_kv *kv = gguf_find_kv(g, key);
  if (!kv) return TS_ENOTFOUND;
  switch (kv->type) {
    case GGUF_TYPE_UINT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_UINT32: case GGUF_TYPE_UINT64:
      *out = kv->v.u64;
      return TS_OK;
    case GGUF_TYPE_INT8: case GGUF_TYPE_INT16: case GGUF_TYPE_INT32: case GGUF_TYPE_INT64:
      if (kv->v.i64 < 0) return TS_EFORMAT;
      *out = (uint64_t)kv->v.i64;
      return TS_OK;
    default:
      return TS_EFORMAT;
  }
}

int gguf_get_f64(const gguf_file *g, const char *key, double *out) {
  const gguf_kv *kv = gguf_find_kv(g, key);
  if (!kv) return TS_ENOTFOUND;
  switch (kv->type) {
    case GGUF_TYPE_FLOAT32: case GGUF_TYPE_FLOAT64: *out = kv->v.f64; return TS_OK;
    case GGUF_TYPE_UINT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_UINT32: case GGUF_TYPE_UINT64:
      *out = (double)kv->v.u64;
      return TS_OK;
    case GGUF_TYPE_INT8: case GGUF_TYPE_INT16: case GGUF_TYPE_INT32: case GGUF_TYPE_INT64:
      *out = (double)kv->v.i64;
      return TS_OK;
    default:
      return TS_EFORMAT;
  }
}

int gguf_get_bool(const gguf_file *g, const char *key, int *out) {
  const gguf_kv *kv = gguf_find_kv(g, key);
  if (!kv) return TS_ENOTFOUND;
  if (kv->type != GGUF_TYPE_BOOL) return TS_EFORMAT;
  *out = kv->v.b;
  return TS_OK;
}

int gguf_get_str(const gguf_file *g, const char *key, gguf_str *out) {
  const gguf_kv *kv = gguf_find_kv(g, key);
  if (!kv) return TS_ENOTFOUND;
  if (kv->type != GGUF_TYPE_STRING) return TS_EFORMAT;
  *out = kv->v.str;
  return TS_OK;
}

int gguf_arr_strs(const gguf_file *g, const gguf_kv *kv, gguf_str *out, ts_err *err) {
  if (kv->type != GGUF_TYPE_ARRAY || kv->arr_type != GGUF_TYPE_STRING)
    return ts_errorf(err, TS_EFORMAT, "%s: metadata '%s' is not an array of strings", g->path,
                     kv->key);
  const uint8_t *p = kv->arr_data;
  gguf_cursor c = {g->map, g->size, (size_t)(p - g->map), g->path, err};
  for (uint64_t i = 0; i < kv->arr_len; i++) TS_TRY(cur_str(&c, &out[i], "metadata string"));
  return TS_OK;
}
