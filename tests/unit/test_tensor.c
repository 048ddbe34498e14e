/* Half-precision conversions against the IEEE definitions, on random and edge values. */
#include <string.h>

#include "test_util.h"
#include "util/tensor.h"

int main(void) {
  /* Every f16 bit pattern survives f16 -> f32 -> f16 (NaNs stay NaN). */
  for (uint32_t h = 0; h < 65536; h++) {
    float f = ts_f16_to_f32((uint16_t)h);
    uint16_t back = ts_f32_to_f16(f);
    if (isnan(f)) CHECK(isnan(ts_f16_to_f32(back)));
    else CHECK_MSG(back == h, "h=%04x f=%g back=%04x", h, f, back);
  }
  /* Known values. */
  CHECK(ts_f16_to_f32(0x3c00) == 1.0f);
  CHECK(ts_f16_to_f32(0xc000) == -2.0f);
  CHECK(ts_f16_to_f32(0x0001) == ldexpf(1.0f, -24));
  CHECK(ts_f32_to_f16(65520.0f) == 0x7c00); /* rounds to infinity */
  CHECK(ts_f32_to_bf16(1.0f) == 0x3f80);
  /* Random floats: bf16 rounding is to nearest, so the error is at most half an ulp (2^-8 rel). */
  test_rng r = {0x9e3779b97f4a7c15ull};
  int distinct = 0;
  float prev = 0;
  for (int i = 0; i < 100000; i++) {
    float x = test_rng_float(&r) * 1000.0f;
    if (x != prev) distinct++;
    prev = x;
    float y = ts_bf16_to_f32(ts_f32_to_bf16(x));
    CHECK(fabsf(y - x) <= fabsf(x) * (1.0f / 256.0f));
    float z = ts_f16_to_f32(ts_f32_to_f16(x));
    CHECK(fabsf(z - x) <= fabsf(x) * (1.0f / 2048.0f) + 1e-7f);
  }
  CHECK(distinct > 99000); /* the inputs really are random */
  return test_finish("test_tensor");
}
