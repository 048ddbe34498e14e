/* Kernel lab for the CPU matmul: times y = x @ w^T through the backend vtable for the shapes of
 * one Qwen3-0.6B layer (and its output projection) at 1, 16 and 512 tokens, per weight dtype and
 * kernel level, on random inputs; prints GFLOP/s and weight GB/s. Built without the rest of the
 * library (see the command below), so it also runs on machines without tessera's dependencies:
 *
 *   gcc -std=c11 -O2 -D_GNU_SOURCE -pthread -Isrc -o cpu_kernels bench/cpu_kernels.c \
 *     src/backend/cpu/[a-z]*.c src/backend/backend.c src/backend/kv_cache.c src/util/log.c \
 *     src/util/status.c src/util/tensor.c src/util/threadpool.c -lm
 *   ./cpu_kernels [THREADS] [LEVEL] [BF16ACT] [FILTER]
 *
 * BF16ACT = 1 runs BF16 weights on activations rounded to BF16 (cpu_backend_set_bf16_act);
 * TESSERA_CPU_AMX=1 / 0 in the environment turns the AMX kernel for BF16 weights on / off;
 * FILTER keeps the shapes whose name contains it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU time of the whole process: on a shared machine, a one-thread run's CPU time per call is
 * the kernel's cost without the time other processes held the core. */
static double cpu_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static uint32_t rnd(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (uint32_t)(rng >> 32);
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 0, level = argc > 2 ? atoi(argv[2]) : 99;
  backend *be = NULL;
  ts_err err = {0};
  if (backend_create(&be, "cpu", threads, &err) < 0) {
    fprintf(stderr, "%s\n", err.msg);
    return 1;
  }
  level = cpu_backend_set_isa(be, level);
  int bf16_act = argc > 3 && atoi(argv[3]) ? cpu_backend_set_bf16_act(be, 1) : 0;
  const char *filter = argc > 4 ? argv[4] : "";
  const struct {
    const char *name;
    int m, k;
  } shapes[] = {{"qkv 4096x1024", 4096, 1024}, {"gate/up 6144x1024", 6144, 1024},
                {"down 1024x3072", 1024, 3072}, {"lm_head 151936x1024", 151936, 1024}};
  const ts_dtype dts[] = {TS_BF16, TS_F16, TS_Q8_0, TS_Q4_0};
  const int ns[] = {1, 16, 512};
  printf("level %d, %d threads, bf16 activations %s, AMX %s (TESSERA_CPU_AMX)\n", level,
         ((cpu_ctx *)be->ctx)->n_threads, bf16_act ? "on" : "off",
         ((cpu_ctx *)be->ctx)->amx && level >= CPU_ISA_AVX512 ? "on" : "off");
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (size_t d = 0; d < sizeof dts / sizeof dts[0]; d++) {
      if (!strstr(shapes[s].name, filter)) continue;
      int m = shapes[s].m, k = shapes[s].k;
      size_t wb = ts_dtype_bytes(dts[d], (int64_t)m * k);
      uint8_t *w = malloc(wb);
      for (size_t i = 0; i < wb; i++) w[i] = (uint8_t)rnd();
      /* Sane scales / finite values: small f16/bf16 patterns. */
      if (dts[d] == TS_BF16 || dts[d] == TS_F16)
        for (size_t i = 0; i < wb / 2; i++)
          ((uint16_t *)w)[i] = dts[d] == TS_BF16 ? ts_f32_to_bf16((float)(rnd() % 2001) / 1e3f - 1)
                                                 : ts_f32_to_f16((float)(rnd() % 2001) / 1e3f - 1);
      if (dts[d] == TS_Q8_0 || dts[d] == TS_Q4_0) {
        int bb = ts_dtype_table[dts[d]].block_bytes;
        for (size_t b = 0; b < wb / bb; b++) {
          uint16_t h = ts_f32_to_f16(0.01f);
          memcpy(w + b * bb, &h, 2);
        }
      }
      ts_tensor t = {.data = w, .dtype = dts[d], .ndim = 2, .shape = {m, k}, .row_stride = k};
      /* As a model load does: the quantized weights may be repacked (TESSERA_CPU_QREPACK=0
       * keeps the file's layout). */
      if (be->ops->weight_prepare(be->ctx, &t, &err) < 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
      }
      for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        int n = ns[ni];
        if (m > 100000 && n > 16) continue; /* logits are for one row per sequence */
        float *x = malloc(sizeof(float) * n * k), *y = malloc(sizeof(float) * (size_t)n * m);
        for (int i = 0; i < n * k; i++) x[i] = (float)(rnd() % 2001) / 1e3f - 1;
        be->ops->matmul(be->ctx, x, &t, NULL, n, y); /* warm */
        int reps = 0;
        double t0 = now_s(), c0 = cpu_s(), dt;
        do {
          be->ops->matmul(be->ctx, x, &t, NULL, n, y);
          reps++;
          dt = now_s() - t0;
        } while (dt < 0.3);
        dt /= reps;
        double ct = (cpu_s() - c0) / reps;
        printf("%-20s %-5s n=%-4d %9.3f ms %8.1f GFLOP/s %7.1f GB/s  cpu %9.3f ms %8.1f GFLOP/s\n",
               shapes[s].name, ts_dtype_table[dts[d]].name, n, dt * 1e3,
               2.0 * n * m * k / dt / 1e9, wb / dt / 1e9, ct * 1e3, 2.0 * n * m * k / ct / 1e9);
        free(x);
        free(y);
      }
      be->ops->weight_release(be->ctx, &t);
      free(w);
    }
  backend_destroy(be);
  return 0;
}
