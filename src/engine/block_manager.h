/* Paged KV block manager: fixed-size blocks, per-sequence block tables, reference counts, a free
 * list, and automatic prefix caching. A full block is identified by the hash of (its parent
 * block's hash, its tokens); cached blocks are shared by every sequence whose prefix matches, and
 * cached blocks nobody holds stay reusable until they are evicted, least recently used first.
 * Owned by the engine thread; no locks. */
#ifndef TESSERA_BLOCK_MANAGER_H
#define TESSERA_BLOCK_MANAGER_H

#include <stdint.h>

#include "util/status.h"

typedef struct block_manager block_manager;

/* One sequence's block table. blocks[i] holds tokens [i*block_size, (i+1)*block_size). */
typedef struct {
  int32_t *blocks;  /* [cap] physical block ids; n in use */
  uint64_t *hashes; /* [cap] prefix hash of each full block; n_hashed valid */
  int n;
  int n_hashed;
  int cap;
} block_table;

int block_manager_create(block_manager **out, int n_blocks, int block_size, int prefix_caching,
                         ts_err *err);
void block_manager_free(block_manager *bm);

int block_manager_block_size(const block_manager *bm);
int block_manager_num_blocks(const block_manager *bm);
/* Blocks that no sequence holds (cached-but-unused blocks count: they can be evicted). */
int block_manager_num_free(const block_manager *bm);
/* 1 when no sequence holds any block. */
int block_manager_all_free(const block_manager *bm);
/* Blocks that are in the prefix cache (held or not). */
int block_manager_num_cached(const block_manager *bm);
int block_manager_prefix_caching(const block_manager *bm);

/* Table memory. A table must be released (block_manager_release) before block_table_free. */
void block_table_init(block_table *t);
void block_table_free(block_table *t);

/* Blocks t still needs to hold n_tokens tokens (0 when it already does). */
int block_manager_blocks_needed(const block_manager *bm, const block_table *t, int n_tokens);
/* Grows t to hold n_tokens. TS_EBUSY, with t unchanged, when too few blocks are free;
 * TS_ENOMEM when the table cannot grow. */
int block_manager_ensure(block_manager *bm, block_table *t, int n_tokens);
/* For an empty table: takes the longest cached prefix of tokens[0..max_tokens) in whole blocks
 * and returns its length in tokens (0 when prefix caching is off or nothing matches). */
int block_manager_acquire_prefix(block_manager *bm, block_table *t, const int32_t *tokens,
                                 int max_tokens);
/* For an empty table dst: shares the first n_blocks blocks of src (reference counts). */
int block_manager_share(block_manager *bm, block_table *dst, const block_table *src, int n_blocks);
/* Records that tokens[0..n_computed) are in t's KV blocks: hashes the newly full blocks and, with
 * prefix caching, offers them to the cache. */
void block_manager_commit(block_manager *bm, block_table *t, const int32_t *tokens, int n_computed);
/* Forgets every cached block (their contents are gone, e.g. the workers restarted); blocks that
 * sequences still hold stay theirs but leave the cache. */
void block_manager_clear_cache(block_manager *bm);
/* Drops t's references; blocks nobody holds become free (or cached-and-evictable). t is left
 * empty and reusable. */
void block_manager_release(block_manager *bm, block_table *t);

#endif
