/* safetensors container: an 8-byte little-endian header length, a JSON header naming each tensor's
 * dtype, shape and byte range, then the data. Parsed from a read-only mapping; every range is
 * checked against the file size. Nothing is copied: tensors are views into the mapping. */
#ifndef TESSERA_SAFETENSORS_H
#define TESSERA_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "util/status.h"
#include "util/tensor.h"

#define ST_DTYPE_UNSUPPORTED TS_DTYPE_COUNT

typedef struct {
  char *name;           /* NUL-terminated copy */
  ts_dtype dtype;       /* ST_DTYPE_UNSUPPORTED for dtypes tessera cannot compute with */
  char dtype_name[16];  /* as the header says ("F32", "I64", ...) */
  int ndim;
  int64_t shape[TS_MAX_DIMS]; /* PyTorch order */
  uint64_t begin, end;  /* byte range relative to the data section */
  const void *data;     /* into the mapping */
} st_tensor;

typedef struct st_file {
  char *path;           /* as given to st_open / st_parse (for error lines) */
  const uint8_t *map;   /* whole file */
  size_t size;
  int mapped;           /* 1 when st_open mapped it (st_close unmaps) */
  int n_tensors;
  st_tensor *tensors;   /* sorted by name */
} st_file;

/* Opens and maps path read-only. Errors name the file ("x.safetensors: truncated header"). */
int st_open(st_file **out, const char *path, ts_err *err);
/* Parses an in-memory image (fuzzing, tests); buf must outlive the result. */
int st_parse(st_file **out, const uint8_t *buf, size_t size, const char *name, ts_err *err);
void st_close(st_file *f);

const st_tensor *st_find(const st_file *f, const char *name);

#endif
