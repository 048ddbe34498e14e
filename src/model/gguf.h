/* GGUF container (versions 2 and 3): header, metadata key/values and the tensor table, parsed
 * from a read-only mapping with every offset and length bounds-checked. */
#ifndef TESSERA_GGUF_H
#define TESSERA_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "util/status.h"
#include "util/tensor.h"

typedef enum {
  GGUF_TYPE_UINT8 = 0, GGUF_TYPE_INT8 = 1, GGUF_TYPE_UINT16 = 2, GGUF_TYPE_INT16 = 3,
  GGUF_TYPE_UINT32 = 4, GGUF_TYPE_INT32 = 5, GGUF_TYPE_FLOAT32 = 6, GGUF_TYPE_BOOL = 7,
  GGUF_TYPE_STRING = 8, GGUF_TYPE_ARRAY = 9, GGUF_TYPE_UINT64 = 10, GGUF_TYPE_INT64 = 11,
  GGUF_TYPE_FLOAT64 = 12, GGUF_TYPE_COUNT
} gguf_type;

typedef struct {
  const char *ptr; /* points into the mapping; NOT NUL-terminated */
  uint64_t len;
} gguf_str;

typedef struct {
  char *key;          /* NUL-terminated copy */
  gguf_type type;
  gguf_type arr_type; /* element type when type == GGUF_TYPE_ARRAY */
  uint64_t arr_len;
  const void *arr_data; /* first element in the mapping (strings: first length prefix) */
  union {
    uint64_t u64;
    int64_t i64;
    double f64;
    int b;
    gguf_str str;
  } v;                /* scalar value, widened */
} gguf_kv;

typedef struct {
  char *name;          /* NUL-terminated copy */
  ts_dtype dtype;
  uint32_t ggml_type;  /* the raw ggml type id */
  int ndim;
  int64_t ne[4];       /* GGUF order: ne[0] is the innermost (contiguous) dimension */
  uint64_t offset;     /* from the start of the data section */
  const void *data;    /* into the mapping */
  uint64_t nbytes;
} gguf_tensor;

typedef struct gguf_file {
  char *path;
  const uint8_t *map; /* whole file, read-only */
  size_t size;
  uint32_t version;
  uint64_t n_kv, n_tensors;
  gguf_kv *kv;
  gguf_tensor *tensors;
  uint64_t alignment;
  uint64_t data_offset;
  int mapped;         /* 1 when gguf_open mapped the file (gguf_close unmaps it) */
} gguf_file;

/* Opens and maps path; errors name the file and what is wrong ("truncated tensor table", ...). */
int gguf_open(gguf_file **out, const char *path, ts_err *err);
/* Parses an in-memory image (fuzzing, tests); buf must outlive the result. */
int gguf_parse(gguf_file **out, const uint8_t *buf, size_t size, const char *name, ts_err *err);
void gguf_close(gguf_file *g);

const gguf_kv *gguf_find_kv(const gguf_file *g, const char *key);
const gguf_tensor *gguf_find_tensor(const gguf_file *g, const char *name);
/* Typed getters; return TS_ENOTFOUND if absent, TS_EFORMAT if the type does not convert. */
int gguf_get_u64(const gguf_file *g, const char *key, uint64_t *out);
int gguf_get_f64(const gguf_file *g, const char *key, double *out);
int gguf_get_bool(const gguf_file *g, const char *key, int *out);
int gguf_get_str(const gguf_file *g, const char *key, gguf_str *out);
/* All elements of a string array in one bounds-checked pass: out must hold kv->arr_len entries. */
int gguf_arr_strs(const gguf_file *g, const gguf_kv *kv, gguf_str *out, ts_err *err);

#endif
