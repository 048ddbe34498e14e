/* Minimal unit-test helpers: CHECK records a failure with file and line and keeps going; the test
 * main returns test_finish(). Random inputs come from a seeded xorshift so failures replay. */
#ifndef TESSERA_TEST_UTIL_H
#define TESSERA_TEST_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int test_failures_ = 0;
static int test_checks_ = 0;

#define CHECK(cond)                                                      \
  do {                                                                   \
    test_checks_++;                                                      \
    if (!(cond)) {                                                       \
      test_failures_++;                                                  \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                    \
  } while (0)

#define CHECK_MSG(cond, ...)                                             \
  do {                                                                   \
    test_checks_++;                                                      \
    if (!(cond)) {                                                       \
      test_failures_++;                                                  \
      fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                      \
      fputc('\n', stderr);                                               \
    }                                                                    \
  } while (0)

static inline int test_finish(const char *name) {
  fprintf(stderr, "%s: %d checks, %d failures\n", name, test_checks_, test_failures_);
  return test_failures_ ? 1 : 0;
}

/* Directory with the shared models/tokenizers: $TESSERA_SHARED or the build-time default. */
static inline const char *test_shared_dir(void) {
  const char *s = getenv("TESSERA_SHARED");
  return s ? s : TESSERA_SHARED_DEFAULT;
}

typedef struct { uint64_t s; } test_rng;
static inline uint64_t test_rng_next(test_rng *r) {
  uint64_t x = r->s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return r->s = x;
}
/* A random seed, printed so that TESSERA_TEST_SEED=<seed> replays the run; never 0. */
static inline uint64_t test_seed(uint64_t salt) {
  const char *s = getenv("TESSERA_TEST_SEED");
  uint64_t v = s ? strtoull(s, NULL, 0) : ((uint64_t)getpid() * 0x9e3779b97f4a7c15ull) ^ salt;
  fprintf(stderr, "seed %llu\n", (unsigned long long)v);
  return v | 1;
}

/* splitmix64's finaliser: a well-mixed hash of x. */
static inline uint64_t test_mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/* Uniform in [-1, 1). */
static inline float test_rng_float(test_rng *r) {
  return (float)((test_rng_next(r) >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

#endif
