/* Paged KV block manager: reference counts, a free stack for uncached blocks, an LRU list of
 * cached blocks nobody holds, and a chained hash table from prefix hash to cached block. */
#include "engine/block_manager.h"

#include <stdlib.h>
#include <string.h>

struct block_manager {
  int n_blocks;
  int block_size;
  int prefix_caching;
  int32_t *ref;        /* [n_blocks] sequences holding the block */
  /* Free stack of blocks that are neither held nor cached. */
  int32_t *free_stack; /* [n_blocks] */
  int n_free_stack;
  /* Cache: which blocks hold a registered full block, its hash, parent hash and tokens. */
  uint8_t *cached;     /* [n_blocks] */
  uint64_t *hash;      /* [n_blocks] */
  uint64_t *parent;    /* [n_blocks] parent prefix hash, for the collision check */
  int32_t *tokens;     /* [n_blocks][block_size] */
  int32_t *bucket;     /* [n_buckets] first block of each chain, -1 when empty */
  int32_t *chain;      /* [n_blocks] next block in the same bucket */
  uint64_t bucket_mask;
  int n_cached;
  /* LRU of cached blocks with ref 0: head is evicted first. */
  int32_t *lru_prev, *lru_next; /* [n_blocks] */
  uint8_t *in_lru;     /* [n_blocks] */
  int lru_head, lru_tail, n_lru;
};

#define BM_ROOT_HASH 0x9e3779b97f4a7c15ull

static uint64_t bm_mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

static uint64_t bm_block_hash(uint64_t parent, const int32_t *tok, int n) {
  uint64_t h = bm_mix(parent + 0x632be59bd9b4e019ull);
  for (int i = 0; i < n; i++) h = bm_mix(h ^ (uint32_t)tok[i]) + (uint64_t)i;
  return h;
}

int block_manager_create(block_manager **out, int n_blocks, int block_size, int prefix_caching,
                         ts_err *err) {
  *out = NULL;
  if (n_blocks <= 0 || block_size <= 0)
    return ts_errorf(err, TS_EINVAL, "block manager: %d blocks of %d tokens", n_blocks, block_size);
  block_manager *bm = calloc(1, sizeof *bm);
  if (!bm) return ts_errorf(err, TS_ENOMEM, "block manager: out of memory");
  bm->n_blocks = n_blocks;
  bm->block_size = block_size;
  bm->prefix_caching = prefix_caching;
  size_t nb = (size_t)n_blocks;
  uint64_t n_buckets = 16;
  while (n_buckets < 2 * nb) n_buckets <<= 1;
  bm->bucket_mask = n_buckets - 1;
  bm->ref = calloc(nb, sizeof *bm->ref);
  bm->free_stack = malloc(nb * sizeof *bm->free_stack);
  bm->cached = calloc(nb, 1);
  bm->hash = calloc(nb, sizeof *bm->hash);
  bm->parent = calloc(nb, sizeof *bm->parent);
  bm->tokens = prefix_caching ? malloc(nb * (size_t)block_size * sizeof *bm->tokens) : NULL;
  bm->bucket = malloc(n_buckets * sizeof *bm->bucket);
  bm->chain = malloc(nb * sizeof *bm->chain);
  bm->lru_prev = malloc(nb * sizeof *bm->lru_prev);
  bm->lru_next = malloc(nb * sizeof *bm->lru_next);
  bm->in_lru = calloc(nb, 1);
  if (!bm->ref || !bm->free_stack || !bm->cached || !bm->hash || !bm->parent ||
      (prefix_caching && !bm->tokens) || !bm->bucket || !bm->chain || !bm->lru_prev ||
      !bm->lru_next || !bm->in_lru) {
    block_manager_free(bm);
    return ts_errorf(err, TS_ENOMEM, "block manager: out of memory for %d blocks", n_blocks);
  }
  for (uint64_t i = 0; i < n_buckets; i++) bm->bucket[i] = -1;
  /* Pop order: block 0 first. */
  for (int i = 0; i < n_blocks; i++) bm->free_stack[i] = n_blocks - 1 - i;
  bm->n_free_stack = n_blocks;
  bm->lru_head = bm->lru_tail = -1;
  *out = bm;
  return 0;
}

void block_manager_free(block_manager *bm) {
  if (!bm) return;
  free(bm->ref);
  free(bm->free_stack);
  free(bm->cached);
  free(bm->hash);
  free(bm->parent);
  free(bm->tokens);
  free(bm->bucket);
  free(bm->chain);
  free(bm->lru_prev);
  free(bm->lru_next);
  free(bm->in_lru);
  free(bm);
}

int block_manager_block_size(const block_manager *bm) { return bm->block_size; }
int block_manager_num_blocks(const block_manager *bm) { return bm->n_blocks; }
int block_manager_num_free(const block_manager *bm) { return bm->n_free_stack + bm->n_lru; }
int block_manager_all_free(const block_manager *bm) {
  return block_manager_num_free(bm) == bm->n_blocks;
}
int block_manager_num_cached(const block_manager *bm) { return bm->n_cached; }
int block_manager_prefix_caching(const block_manager *bm) { return bm->prefix_caching; }

void block_table_init(block_table *t) { memset(t, 0, sizeof *t); }

void block_table_free(block_table *t) {
  free(t->blocks);
  free(t->hashes);
  block_table_init(t);
}

static int table_reserve(block_table *t, int cap) {
  if (cap <= t->cap) return 0;
  int nc = t->cap ? t->cap : 8;
  while (nc < cap) nc *= 2;
  int32_t *b = realloc(t->blocks, (size_t)nc * sizeof *b);
  if (!b) return TS_ENOMEM;
  t->blocks = b;
  uint64_t *h = realloc(t->hashes, (size_t)nc * sizeof *h);
  if (!h) return TS_ENOMEM;
  t->hashes = h;
  t->cap = nc;
  return 0;
}

/* ---- LRU of evictable cached blocks ---- */

static void lru_remove(block_manager *bm, int b) {
  int p = bm->lru_prev[b], n = bm->lru_next[b];
  if (p >= 0) bm->lru_next[p] = n; else bm->lru_head = n;
  if (n >= 0) bm->lru_prev[n] = p; else bm->lru_tail = p;
  bm->in_lru[b] = 0;
  bm->n_lru--;
}

static void lru_push_tail(block_manager *bm, int b) {
  bm->lru_prev[b] = bm->lru_tail;
  bm->lru_next[b] = -1;
  if (bm->lru_tail >= 0) bm->lru_next[bm->lru_tail] = b; else bm->lru_head = b;
  bm->lru_tail = b;
  bm->in_lru[b] = 1;
  bm->n_lru++;
}

/* ---- hash table of cached blocks ---- */

static int cache_find(const block_manager *bm, uint64_t h, uint64_t parent, const int32_t *tok) {
  size_t bytes = (size_t)bm->block_size * sizeof *tok;
  for (int b = bm->bucket[h & bm->bucket_mask]; b >= 0; b = bm->chain[b])
    if (bm->hash[b] == h && bm->parent[b] == parent &&
        !memcmp(bm->tokens + (size_t)b * bm->block_size, tok, bytes))
      return b;
  return -1;
}

static void cache_insert(block_manager *bm, int b, uint64_t h, uint64_t parent, const int32_t *tok) {
  size_t slot = h & bm->bucket_mask;
  bm->hash[b] = h;
  bm->parent[b] = parent;
  memcpy(bm->tokens + (size_t)b * bm->block_size, tok, (size_t)bm->block_size * sizeof *tok);
  bm->chain[b] = bm->bucket[slot];
  bm->bucket[slot] = b;
  bm->cached[b] = 1;
  bm->n_cached++;
}

static void cache_remove(block_manager *bm, int b) {
  int32_t *link = &bm->bucket[bm->hash[b] & bm->bucket_mask];
  while (*link != b) link = &bm->chain[*link];
  *link = bm->chain[b];
  bm->cached[b] = 0;
  bm->n_cached--;
}

/* Takes a block for new content: an uncached free block, else the least recently used cached
 * one (which leaves the cache). -1 when none is free. */
static int block_take(block_manager *bm) {
  int b;
  if (bm->n_free_stack > 0) {
    b = bm->free_stack[--bm->n_free_stack];
  } else if (bm->lru_head >= 0) {
    b = bm->lru_head;
    lru_remove(bm, b);
    cache_remove(bm, b);
  } else {
    return -1;
  }
  bm->ref[b] = 1;
  return b;
}

static void block_unref(block_manager *bm, int b) {
  if (--bm->ref[b] > 0) return;
  if (bm->cached[b]) lru_push_tail(bm, b);
  else bm->free_stack[bm->n_free_stack++] = b;
}

int block_manager_blocks_needed(const block_manager *bm, const block_table *t, int n_tokens) {
  int need = (n_tokens + bm->block_size - 1) / bm->block_size - t->n;
  return need > 0 ? need : 0;
}

int block_manager_ensure(block_manager *bm, block_table *t, int n_tokens) {
  int need = block_manager_blocks_needed(bm, t, n_tokens);
  if (need == 0) return 0;
  if (need > block_manager_num_free(bm)) return TS_EBUSY;
  if (table_reserve(t, t->n + need) < 0) return TS_ENOMEM;
  for (int i = 0; i < need; i++) t->blocks[t->n++] = block_take(bm);
  return 0;
}

int block_manager_acquire_prefix(block_manager *bm, block_table *t, const int32_t *tokens,
                                 int max_tokens) {
  if (!bm->prefix_caching || t->n != 0) return 0;
  int bs = bm->block_size, n_full = max_tokens / bs;
  if (n_full <= 0 || table_reserve(t, n_full) < 0) return 0;
  uint64_t parent = BM_ROOT_HASH;
  for (int i = 0; i < n_full; i++) {
    const int32_t *tok = tokens + (size_t)i * bs;
    uint64_t h = bm_block_hash(parent, tok, bs);
    int b = cache_find(bm, h, parent, tok);
    if (b < 0) break;
    if (bm->in_lru[b]) lru_remove(bm, b);
    bm->ref[b]++;
    t->blocks[t->n] = b;
    t->hashes[t->n] = h;
    t->n++;
    parent = h;
  }
  t->n_hashed = t->n;
  return t->n * bs;
}

int block_manager_share(block_manager *bm, block_table *dst, const block_table *src, int n_blocks) {
  if (dst->n != 0 || n_blocks > src->n) return TS_EINVAL;
  if (table_reserve(dst, n_blocks) < 0) return TS_ENOMEM;
  for (int i = 0; i < n_blocks; i++) {
    int b = src->blocks[i];
    if (bm->in_lru[b]) lru_remove(bm, b);
    bm->ref[b]++;
    dst->blocks[i] = b;
  }
  dst->n = n_blocks;
  dst->n_hashed = n_blocks < src->n_hashed ? n_blocks : src->n_hashed;
  if (dst->n_hashed) memcpy(dst->hashes, src->hashes, (size_t)dst->n_hashed * sizeof *dst->hashes);
  return 0;
}

void block_manager_commit(block_manager *bm, block_table *t, const int32_t *tokens, int n_computed) {
  int bs = bm->block_size;
  int n_full = n_computed / bs;
  if (n_full > t->n) n_full = t->n;
  for (int i = t->n_hashed; i < n_full; i++) {
    uint64_t parent = i ? t->hashes[i - 1] : BM_ROOT_HASH;
    const int32_t *tok = tokens + (size_t)i * bs;
    uint64_t h = bm_block_hash(parent, tok, bs);
    t->hashes[i] = h;
    int b = t->blocks[i];
    /* A block with the same content may already be cached (two sequences prefilled the same
     * prefix at once): keep the first, this one stays private and is freed normally. */
    if (bm->prefix_caching && !bm->cached[b] && cache_find(bm, h, parent, tok) < 0)
      cache_insert(bm, b, h, parent, tok);
  }
  if (n_full > t->n_hashed) t->n_hashed = n_full;
}

void block_manager_release(block_manager *bm, block_table *t) {
  /* Last block first: the LRU then evicts a sequence's tail before its prefix. */
  for (int i = t->n - 1; i >= 0; i--) block_unref(bm, t->blocks[i]);
  t->n = 0;
  t->n_hashed = 0;
}

void block_manager_clear_cache(block_manager *bm) {
  while (bm->lru_head >= 0) {
    int b = bm->lru_head;
    lru_remove(bm, b);
    cache_remove(bm, b);
    bm->free_stack[bm->n_free_stack++] = b;
  }
  for (int b = 0; b < bm->n_blocks; b++)
    if (bm->cached[b]) cache_remove(bm, b);
}
