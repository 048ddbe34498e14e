/* GGUF container: random metadata of every scalar type written by a small in-test writer and read
 * back through the typed getters (with their conversion rules), string arrays, nested arrays,
 * custom alignment, version 2, and tensor placement and bounds. */
#include <string.h>

#include "model/gguf.h"
#include "test_util.h"

typedef struct {
  uint8_t *b;
  size_t n, cap;
} wbuf;

static void put(wbuf *w, const void *p, size_t n) {
  if (w->n + n > w->cap) {
    w->cap = (w->n + n) * 2 + 64;
    w->b = realloc(w->b, w->cap);
  }
  memcpy(w->b + w->n, p, n);
  w->n += n;
}
static void put_u32(wbuf *w, uint32_t v) { put(w, &v, 4); }
static void put_u64(wbuf *w, uint64_t v) { put(w, &v, 8); }
static void put_str(wbuf *w, const char *s) {
  put_u64(w, strlen(s));
  put(w, s, strlen(s));
}

static const int scalar_size[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

typedef struct {
  char key[32];
  uint32_t type;
  uint8_t raw[8];
} kv_rec;

int main(void) {
  test_rng rng = {0x123456789abcdefull};
  int distinct = 0;
  uint64_t prev = 0;
  for (int iter = 0; iter < 200; iter++) {
    /* Header + n random scalar kvs + one string + string array + nested array + 2 tensors. */
    int nkv = 1 + (int)(test_rng_next(&rng) % 12);
    kv_rec recs[16];
    uint64_t align = iter % 3 == 0 ? 64 : 32;
    uint32_t version = iter % 2 ? 3 : 2;
    wbuf w = {0};
    put_u32(&w, 0x46554747u);
    put_u32(&w, version);
    put_u64(&w, 2);               /* tensors */
    put_u64(&w, (uint64_t)nkv + 4); /* kvs */
    for (int i = 0; i < nkv; i++) {
      kv_rec *r = &recs[i];
      snprintf(r->key, sizeof r->key, "k.%d", i);
      static const uint32_t types[] = {0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12};
      r->type = types[test_rng_next(&rng) % 11];
      uint64_t v = test_rng_next(&rng);
      if (v != prev) distinct++;
      prev = v;
      if (r->type == 6) { float f = (float)(int64_t)v / 1e9f; memcpy(r->raw, &f, 4); }
      else if (r->type == 12) { double d = (double)(int64_t)v / 1e9; memcpy(r->raw, &d, 8); }
      else memcpy(r->raw, &v, 8);
      put_str(&w, r->key);
      put_u32(&w, r->type);
      put(&w, r->raw, (size_t)scalar_size[r->type]);
    }
    put_str(&w, "general.alignment");
    put_u32(&w, GGUF_TYPE_UINT32);
    put_u32(&w, (uint32_t)align);
    put_str(&w, "s");
    put_u32(&w, GGUF_TYPE_STRING);
    put_str(&w, "hello");
    put_str(&w, "strs");
    put_u32(&w, GGUF_TYPE_ARRAY);
    put_u32(&w, GGUF_TYPE_STRING);
    put_u64(&w, 3);
    put_str(&w, "a");
    put_str(&w, "");
    put_str(&w, "xyz");
    put_str(&w, "nested");
    put_u32(&w, GGUF_TYPE_ARRAY);
    put_u32(&w, GGUF_TYPE_ARRAY);
    put_u64(&w, 2);
    for (int k = 0; k < 2; k++) {
      put_u32(&w, GGUF_TYPE_INT16);
      put_u64(&w, 3);
      int16_t x[3] = {1, 2, 3};
      put(&w, x, 6);
    }
    /* Tensors: an F32 [3][8] (ne = {8, 3}) and an F16 [4] at the next aligned offset. */
    put_str(&w, "t.f32");
    put_u32(&w, 2);
    put_u64(&w, 8);
    put_u64(&w, 3);
    put_u32(&w, 0);
    put_u64(&w, 0);
    put_str(&w, "t.f16");
    put_u32(&w, 1);
    put_u64(&w, 4);
    put_u32(&w, 1);
    put_u64(&w, align * ((96 + align - 1) / align));
    size_t data_off = (w.n + align - 1) / align * align;
    while (w.n < data_off) put(&w, "", 1);
    float vals[24];
    for (int i = 0; i < 24; i++) vals[i] = test_rng_float(&rng);
    put(&w, vals, sizeof vals);
    while (w.n < data_off + align * ((96 + align - 1) / align)) put(&w, "", 1);
    uint16_t h[4] = {0x3c00, 0x4000, 0xc000, 0};
    put(&w, h, sizeof h);

    gguf_file *g = NULL;
    ts_err err;
    int rc = gguf_parse(&g, w.b, w.n, "t.gguf", &err);
    CHECK_MSG(rc == TS_OK, "%s", err.msg);
    if (rc) {
      free(w.b);
      continue;
    }
    CHECK(g->version == version && g->alignment == align && g->data_offset == data_off);
    for (int i = 0; i < nkv; i++) {
      kv_rec *r = &recs[i];
      uint64_t u = 0;
      double d = 0;
      int b = -1;
      int64_t sv = 0;
      uint64_t uv = 0;
      switch (r->type) {
        case 0: uv = r->raw[0]; break;
        case 1: sv = (int8_t)r->raw[0]; break;
        case 2: { uint16_t x; memcpy(&x, r->raw, 2); uv = x; break; }
        case 3: { int16_t x; memcpy(&x, r->raw, 2); sv = x; break; }
        case 4: { uint32_t x; memcpy(&x, r->raw, 4); uv = x; break; }
        case 5: { int32_t x; memcpy(&x, r->raw, 4); sv = x; break; }
        case 10: memcpy(&uv, r->raw, 8); break;
        case 11: memcpy(&sv, r->raw, 8); break;
        default: break;
      }
      int is_uint = r->type == 0 || r->type == 2 || r->type == 4 || r->type == 10;
      int is_int = r->type == 1 || r->type == 3 || r->type == 5 || r->type == 11;
      int urc = gguf_get_u64(g, r->key, &u);
      if (is_uint) CHECK(urc == TS_OK && u == uv);
      else if (is_int && sv >= 0) CHECK(urc == TS_OK && u == (uint64_t)sv);
      else CHECK(urc == TS_EFORMAT);
      int drc = gguf_get_f64(g, r->key, &d);
      if (r->type == 6) { float f; memcpy(&f, r->raw, 4); CHECK(drc == TS_OK && d == (double)f); }
      else if (r->type == 12) { double x; memcpy(&x, r->raw, 8); CHECK(drc == TS_OK && d == x); }
      else if (is_uint) CHECK(drc == TS_OK && d == (double)uv);
      else if (is_int) CHECK(drc == TS_OK && d == (double)sv);
      else CHECK(drc == TS_EFORMAT);
      int brc = gguf_get_bool(g, r->key, &b);
      if (r->type == 7) CHECK(brc == TS_OK && b == (r->raw[0] != 0));
      else CHECK(brc == TS_EFORMAT);
    }
    uint64_t u;
    gguf_str s;
    CHECK(gguf_get_u64(g, "absent", &u) == TS_ENOTFOUND);
    CHECK(gguf_get_str(g, "s", &s) == TS_OK && s.len == 5 && !memcmp(s.ptr, "hello", 5));
    CHECK(gguf_get_str(g, "strs", &s) == TS_EFORMAT);
    const gguf_kv *kv = gguf_find_kv(g, "strs");
    gguf_str arr[3];
    CHECK(kv && kv->arr_len == 3 && gguf_arr_strs(g, kv, arr, &err) == TS_OK);
    CHECK(arr[0].len == 1 && arr[1].len == 0 && arr[2].len == 3 && !memcmp(arr[2].ptr, "xyz", 3));
    kv = gguf_find_kv(g, "nested");
    CHECK(kv && kv->arr_type == GGUF_TYPE_ARRAY && kv->arr_len == 2);
    CHECK(gguf_arr_strs(g, kv, arr, &err) == TS_EFORMAT);
    const gguf_tensor *t = gguf_find_tensor(g, "t.f32");
    CHECK(t && t->dtype == TS_F32 && t->ndim == 2 && t->ne[0] == 8 && t->ne[1] == 3);
    CHECK(t && t->nbytes == 96 && !memcmp(t->data, vals, 96));
    t = gguf_find_tensor(g, "t.f16");
    CHECK(t && t->dtype == TS_F16 && t->nbytes == 8 && !memcmp(t->data, h, 8));
    gguf_close(g);

    /* The same image cut anywhere fails cleanly. */
    size_t cut = (size_t)(test_rng_next(&rng) % w.n);
    CHECK(gguf_parse(&g, w.b, cut, "t.gguf", &err) < 0 && !strncmp(err.msg, "t.gguf: ", 8));
    /* A tensor offset that is not aligned is refused. */
    uint8_t *c = malloc(w.n);
    memcpy(c, w.b, w.n);
    size_t off_pos = data_off; /* find the second tensor's offset field: last 8 bytes before pad */
    for (size_t k = w.n - 8; k > 0; k--) {
      uint64_t x;
      memcpy(&x, c + k, 8);
      if (k + 8 <= data_off && x == align * ((96 + align - 1) / align)) {
        off_pos = k;
        break;
      }
    }
    uint64_t bad = 4;
    memcpy(c + off_pos, &bad, 8);
    CHECK(gguf_parse(&g, c, w.n, "t.gguf", &err) == TS_EFORMAT && strstr(err.msg, "not aligned"));
    free(c);
    free(w.b);
  }
  CHECK(distinct > 190);
  return test_finish("test_gguf");
}
