/* safetensors header parsing (jansson) and the read-only mapping of the file. */
#include "model/safetensors.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/mapfile.h"

/* Headers past this size are not model files (the format's own reader caps them at 100 MB). */
#define ST_MAX_HEADER (100u * 1024u * 1024u)

typedef struct {
  const char *name;
  ts_dtype dtype;
  int elem_bytes;
} st_dtype_desc;

static const st_dtype_desc st_dtypes[] = {
    {"F32", TS_F32, 4},  {"F16", TS_F16, 2},   {"BF16", TS_BF16, 2},
    {"F64", ST_DTYPE_UNSUPPORTED, 8},          {"I64", ST_DTYPE_UNSUPPORTED, 8},
    {"U64", ST_DTYPE_UNSUPPORTED, 8},          {"I32", ST_DTYPE_UNSUPPORTED, 4},
    {"U32", ST_DTYPE_UNSUPPORTED, 4},          {"I16", ST_DTYPE_UNSUPPORTED, 2},
    {"U16", ST_DTYPE_UNSUPPORTED, 2},          {"I8", ST_DTYPE_UNSUPPORTED, 1},
    {"U8", ST_DTYPE_UNSUPPORTED, 1},           {"BOOL", ST_DTYPE_UNSUPPORTED, 1},
    {"F8_E4M3", ST_DTYPE_UNSUPPORTED, 1},      {"F8_E5M2", ST_DTYPE_UNSUPPORTED, 1},
};

static const st_dtype_desc *st_dtype_lookup(const char *s) {
  for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
    if (!strcmp(st_dtypes[i].name, s)) return &st_dtypes[i];
  return NULL;
}

static int st_cmp_tensor(const void *a, const void *b) {
  return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

static void st_free_tensors(st_file *f) {
  if (!f->tensors) return;
  for (int i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
  free(f->tensors);
  f->tensors = NULL;
}

/* Fills t from one header entry {"dtype":..., "shape":[...], "data_offsets":[b, e]}. */
static int st_parse_entry(st_file *f, const char *key, json_t *v, uint64_t data_size,
                          st_tensor *t, ts_err *err) {
  const char *fn = f->path;
  if (!json_is_object(v))
    return ts_errorf(err, TS_EFORMAT, "%s: tensor '%s': header entry is not an object", fn, key);
  json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"),
         *jo = json_object_get(v, "data_offsets");
  if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) || json_array_size(jo) != 2)
    return ts_errorf(err, TS_EFORMAT,
                     "%s: tensor '%s': header entry needs dtype, shape and data_offsets [begin, end]",
                     fn, key);
  const char *ds = json_string_value(jd);
  const st_dtype_desc *dd = st_dtype_lookup(ds);
  snprintf(t->dtype_name, sizeof t->dtype_name, "%.15s", ds);
  t->dtype = dd ? dd->dtype : ST_DTYPE_UNSUPPORTED;
  size_t nd = json_array_size(js);
  if (nd > TS_MAX_DIMS)
    return ts_errorf(err, TS_EUNSUPPORTED, "%s: tensor '%s' has %zu dimensions (at most %d)", fn,
                     key, nd, TS_MAX_DIMS);
  t->ndim = (int)nd;
  uint64_t nelem = 1;
  for (size_t i = 0; i < nd; i++) {
    json_t *d = json_array_get(js, i);
    if (!json_is_integer(d) || json_integer_value(d) < 0)
      return ts_errorf(err, TS_EFORMAT, "%s: tensor '%s': shape entries must be integers >= 0", fn,
                       key);
    t->shape[i] = json_integer_value(d);
    if (__builtin_mul_overflow(nelem, (uint64_t)t->shape[i], &nelem))
      return ts_errorf(err, TS_EFORMAT, "%s: tensor '%s': shape overflows", fn, key);
  }
  for (int i = 0; i < 2; i++) {
    json_t *o = json_array_get(jo, (size_t)i);
    if (!json_is_integer(o) || json_integer_value(o) < 0)
      return ts_errorf(err, TS_EFORMAT, "%s: tensor '%s': data_offsets must be integers >= 0", fn,
                       key);
  }
  t->begin = (uint64_t)json_integer_value(json_array_get(jo, 0));
  t->end = (uint64_t)json_integer_value(json_array_get(jo, 1));
  if (t->begin > t->end || t->end > data_size)
    return ts_errorf(err, TS_EFORMAT,
                     "%s: tensor '%s': data_offsets [%llu, %llu] outside the %llu data bytes (file "
                     "truncated?)",
                     fn, key, (unsigned long long)t->begin, (unsigned long long)t->end,
                     (unsigned long long)data_size);
  if (dd) {
    uint64_t want;
    if (__builtin_mul_overflow(nelem, (uint64_t)dd->elem_bytes, &want) || want != t->end - t->begin)
      return ts_errorf(err, TS_EFORMAT,
                       "%s: tensor '%s': %llu data bytes, but dtype %s and its shape need %llu", fn,
                       key, (unsigned long long)(t->end - t->begin), ds,
                       (unsigned long long)(nelem * (uint64_t)dd->elem_bytes));
  }
  return TS_OK;
}

int st_parse(st_file **out, const uint8_t *buf, size_t size, const char *name, ts_err *err) {
  *out = NULL;
  const char *fn = name ? name : "safetensors";
  if (size < 8) return ts_errorf(err, TS_EFORMAT, "%s: truncated (%zu bytes, no header)", fn, size);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | buf[i];
  if (hlen > ST_MAX_HEADER || hlen > size - 8)
    return ts_errorf(err, TS_EFORMAT, "%s: header length %llu exceeds the file (%zu bytes)", fn,
                     (unsigned long long)hlen, size);
  json_error_t je;
  json_t *root = json_loadb((const char *)buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &je);
  if (!root)
    return ts_errorf(err, TS_EFORMAT, "%s: header is not valid JSON (%s at byte %d)", fn, je.text,
                     je.position);
  int rc = TS_OK;
  st_file *f = calloc(1, sizeof *f);
  if (!f || !(f->path = strdup(fn))) {
    free(f);
    json_decref(root);
    return ts_errorf(err, TS_ENOMEM, "%s: out of memory", fn);
  }
  f->map = buf;
  f->size = size;
  if (!json_is_object(root)) {
    rc = ts_errorf(err, TS_EFORMAT, "%s: header is not a JSON object", fn);
    goto done;
  }
  size_t n = json_object_size(root);
  f->tensors = calloc(n ? n : 1, sizeof *f->tensors);
  if (!f->tensors) {
    rc = ts_errorf(err, TS_ENOMEM, "%s: out of memory", fn);
    goto done;
  }
  uint64_t data_start = 8 + hlen, data_size = size - data_start;
  const char *key;
  json_t *v;
  json_object_foreach(root, key, v) {
    if (!strcmp(key, "__metadata__")) continue;
    st_tensor *t = &f->tensors[f->n_tensors];
    if ((rc = st_parse_entry(f, key, v, data_size, t, err)) < 0) goto done;
    if (!(t->name = strdup(key))) {
      rc = ts_errorf(err, TS_ENOMEM, "%s: out of memory", fn);
      goto done;
    }
    t->data = buf + data_start + t->begin;
    f->n_tensors++;
  }
  qsort(f->tensors, (size_t)f->n_tensors, sizeof *f->tensors, st_cmp_tensor);
done:
  json_decref(root);
  if (rc < 0) {
    st_close(f);
    return rc;
  }
  *out = f;
  return TS_OK;
}

int st_open(st_file **out, const char *path, ts_err *err) {
  *out = NULL;
  const void *map;
  size_t size;
  TS_TRY(ts_map_file(path, 8, "no header", &map, &size, err));
  int rc = st_parse(out, map, size, path, err);
  if (rc < 0) {
    ts_unmap_file(map, size);
    return rc;
  }
  (*out)->mapped = 1;
  return TS_OK;
}

void st_close(st_file *f) {
  if (!f) return;
  st_free_tensors(f);
  if (f->mapped) ts_unmap_file(f->map, f->size);
  free(f->path);
  free(f);
}

const st_tensor *st_find(const st_file *f, const char *name) {
  st_tensor key = {.name = (char *)name};
  return bsearch(&key, f->tensors, (size_t)f->n_tensors, sizeof *f->tensors, st_cmp_tensor);
}
