/* Block manager: random workloads of sequences that share prefixes, checked against a shadow copy
 * of what each physical block holds (a cache hit must hand out blocks whose content is exactly the
 * requested prefix), plus reference-count and free-count invariants, LRU eviction and release. */
#include <string.h>

#include "engine/block_manager.h"
#include "test_util.h"

#define NSEQ 12
#define MAXTOK 200

typedef struct {
  block_table t;
  int32_t tok[MAXTOK];
  int n_tok;
  int n_computed;
  int live;
} shadow_seq;

static int32_t *content; /* [n_blocks][bs] what the "KV cache" holds, -1 unknown */

static void write_content(shadow_seq *s, int from, int to, int bs) {
  for (int p = from; p < to; p++) content[s->t.blocks[p / bs] * bs + p % bs] = s->tok[p];
}

static void check_invariants(block_manager *bm, shadow_seq *seqs, int n_blocks) {
  int held = 0;
  static int seen[4096];
  memset(seen, 0, sizeof seen);
  for (int i = 0; i < NSEQ; i++)
    if (seqs[i].live)
      for (int j = 0; j < seqs[i].t.n; j++)
        if (!seen[seqs[i].t.blocks[j]]++) held++;
  CHECK_MSG(block_manager_num_free(bm) == n_blocks - held, "free %d held %d of %d",
            block_manager_num_free(bm), held, n_blocks);
}

static void run(uint64_t seed, int n_blocks, int bs, int caching) {
  test_rng r = {seed};
  block_manager *bm;
  ts_err err;
  CHECK(block_manager_create(&bm, n_blocks, bs, caching, &err) == 0);
  content = malloc((size_t)n_blocks * bs * sizeof *content);
  for (int i = 0; i < n_blocks * bs; i++) content[i] = -1;
  shadow_seq seqs[NSEQ];
  memset(seqs, 0, sizeof seqs);
  for (int i = 0; i < NSEQ; i++) block_table_init(&seqs[i].t);
  /* A few base prompts so that prefixes repeat. */
  int32_t base[3][MAXTOK];
  for (int b = 0; b < 3; b++)
    for (int i = 0; i < MAXTOK; i++) base[b][i] = (int32_t)(test_rng_next(&r) % 7);
  int hits = 0;
  for (int step = 0; step < 3000; step++) {
    shadow_seq *s = &seqs[test_rng_next(&r) % NSEQ];
    int op = (int)(test_rng_next(&r) % 10);
    if (!s->live) {
      /* Start: a base prompt prefix, maybe with a divergent tail. */
      int b = (int)(test_rng_next(&r) % 3);
      s->n_tok = 1 + (int)(test_rng_next(&r) % 120);
      memcpy(s->tok, base[b], (size_t)s->n_tok * sizeof(int32_t));
      int div = (int)(test_rng_next(&r) % (s->n_tok + 1));
      for (int i = div; i < s->n_tok; i++) s->tok[i] = (int32_t)(test_rng_next(&r) % 7);
      int got = block_manager_acquire_prefix(bm, &s->t, s->tok, s->n_tok - 1);
      CHECK(got % bs == 0 && got <= s->n_tok - 1);
      if (!caching) CHECK(got == 0);
      if (got) hits++;
      for (int p = 0; p < got; p++)
        CHECK_MSG(content[s->t.blocks[p / bs] * bs + p % bs] == s->tok[p], "stale cached block");
      s->n_computed = got;
      s->live = 1;
    } else if (op < 7) {
      /* Compute a chunk (maybe appending generated tokens first). */
      if (s->n_computed == s->n_tok && s->n_tok < MAXTOK)
        s->tok[s->n_tok++] = (int32_t)(test_rng_next(&r) % 7);
      int chunk = 1 + (int)(test_rng_next(&r) % 40);
      int to = s->n_computed + chunk;
      if (to > s->n_tok) to = s->n_tok;
      int free_before = block_manager_num_free(bm);
      int need = block_manager_blocks_needed(bm, &s->t, to);
      int rc = block_manager_ensure(bm, &s->t, to);
      if (rc == TS_EBUSY) {
        CHECK(need > free_before && block_manager_num_free(bm) == free_before);
        block_manager_release(bm, &s->t); /* preempted */
        s->live = 0;
      } else {
        CHECK(rc == 0);
        CHECK(block_manager_num_free(bm) == free_before - need);
        write_content(s, s->n_computed, to, bs);
        s->n_computed = to;
        block_manager_commit(bm, &s->t, s->tok, s->n_computed);
      }
    } else if (op < 9) {
      block_manager_release(bm, &s->t);
      CHECK(s->t.n == 0);
      s->live = 0;
    } else {
      /* Fork into another dead slot, sharing whole computed blocks. */
      for (int j = 0; j < NSEQ; j++) {
        shadow_seq *d = &seqs[j];
        if (d->live) continue;
        int k = (s->n_computed - 1) / bs;
        if (k < 0) k = 0;
        CHECK(block_manager_share(bm, &d->t, &s->t, k) == 0);
        memcpy(d->tok, s->tok, sizeof s->tok);
        d->n_tok = s->n_tok;
        d->n_computed = k * bs;
        d->live = 1;
        break;
      }
    }
    check_invariants(bm, seqs, n_blocks);
  }
  if (caching) CHECK_MSG(hits > 0, "no prefix cache hit in a workload with shared prefixes");
  for (int i = 0; i < NSEQ; i++) {
    block_manager_release(bm, &seqs[i].t);
    block_table_free(&seqs[i].t);
  }
  CHECK(block_manager_all_free(bm));
  free(content);
  block_manager_free(bm);
}

/* LRU: a released cached prefix survives until its blocks are needed, and the least recently
 * released blocks go first. */
static void test_lru(void) {
  block_manager *bm;
  ts_err err;
  CHECK(block_manager_create(&bm, 4, 2, 1, &err) == 0);
  int32_t a[4] = {1, 2, 3, 4}, b[4] = {5, 6, 7, 8};
  block_table ta, tb, tc;
  block_table_init(&ta);
  block_table_init(&tb);
  block_table_init(&tc);
  CHECK(block_manager_ensure(bm, &ta, 4) == 0);
  block_manager_commit(bm, &ta, a, 4);
  block_manager_release(bm, &ta);
  CHECK(block_manager_ensure(bm, &tb, 4) == 0);
  block_manager_commit(bm, &tb, b, 4);
  block_manager_release(bm, &tb);
  CHECK(block_manager_num_cached(bm) == 4 && block_manager_all_free(bm));
  CHECK(block_manager_acquire_prefix(bm, &tc, a, 4) == 4);
  block_manager_release(bm, &tc);
  /* a was used last: taking two fresh blocks evicts b's. */
  CHECK(block_manager_ensure(bm, &tc, 4) == 0);
  block_manager_release(bm, &tc);
  CHECK(block_manager_acquire_prefix(bm, &tc, b, 4) == 0);
  CHECK(block_manager_acquire_prefix(bm, &tc, a, 4) == 4);
  /* A different block with the same first token does not match. */
  int32_t a2[4] = {1, 2, 3, 5};
  CHECK(block_manager_acquire_prefix(bm, &tb, a2, 4) == 2);
  CHECK(block_manager_ensure(bm, &ta, 6) == TS_EBUSY); /* 2 held by tc (1 shared), 4 total */
  block_manager_release(bm, &tb);
  /* Clearing the cache keeps tc's blocks held but no longer findable. */
  block_manager_clear_cache(bm);
  CHECK(block_manager_num_cached(bm) == 0 && block_manager_num_free(bm) == 2);
  CHECK(block_manager_acquire_prefix(bm, &tb, a, 4) == 0);
  block_manager_release(bm, &tc);
  CHECK(block_manager_all_free(bm) && block_manager_num_cached(bm) == 0);
  block_table_free(&ta);
  block_table_free(&tb);
  block_table_free(&tc);
  block_manager_free(bm);
}

int main(void) {
  test_rng r = {0x5eed1234abcdull};
  for (int it = 0; it < 12; it++) {
    int bs = 1 + (int)(test_rng_next(&r) % 8);
    int nb = 8 + (int)(test_rng_next(&r) % 120);
    run(test_rng_next(&r) | 1, nb, bs, it % 3 != 0);
  }
  test_lru();
  return test_finish("test_block_manager");
}
