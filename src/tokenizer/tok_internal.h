/* Internal layout of a tokenizer shared by the loaders (tok_hf.c, tok_gguf.c), the BPE model
 * (tok_bpe.c), the encode/decode pipeline (tokenizer.c) and the UTF-8/hash helpers (tok_util.c). */
#ifndef TESSERA_TOK_INTERNAL_H
#define TESSERA_TOK_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "tokenizer/tokenizer.h"

/* ---- growable byte buffer ---- */
typedef struct {
  char *p;
  size_t len, cap;
} tok_buf;
int tok_buf_reserve(tok_buf *b, size_t extra);
int tok_buf_put(tok_buf *b, const void *s, size_t n);
int tok_buf_putc(tok_buf *b, char c);
void tok_buf_free(tok_buf *b);

/* ---- string -> id map; keys live in an external string table (pieces[id]) ---- */
typedef struct {
  uint32_t cap; /* power of two */
  int32_t *slots; /* id or -1 */
  char **keys;    /* key of id (borrowed) */
  uint32_t *key_len;
} tok_strmap;
int tok_strmap_init(tok_strmap *m, size_t n_expected, char **keys, uint32_t *key_len);
/* Inserts id (its key is keys[id]); an existing equal key keeps its first id. */
int tok_strmap_put(tok_strmap *m, int32_t id);
int32_t tok_strmap_get(const tok_strmap *m, const char *s, size_t len);
void tok_strmap_free(tok_strmap *m);

/* ---- (id, id) -> (rank, new id) map for BPE merges ---- */
typedef struct {
  uint64_t key;
  int32_t rank, new_id;
} tok_merge;
typedef struct {
  uint32_t cap;
  tok_merge *slots; /* key == UINT64_MAX: empty */
} tok_mergemap;
int tok_mergemap_init(tok_mergemap *m, size_t n_expected);
/* Keeps the first (lowest-rank) entry of a repeated pair. */
int tok_mergemap_put(tok_mergemap *m, int32_t a, int32_t b, int32_t rank, int32_t new_id);
const tok_merge *tok_mergemap_get(const tok_mergemap *m, int32_t a, int32_t b);
void tok_mergemap_free(tok_mergemap *m);

/* ---- UTF-8 ---- */
/* Length of the valid UTF-8 sequence at s (1..4), 0 if s[0..n) starts with an invalid one;
 * *partial is set when the bytes are a valid but truncated prefix. */
int tok_utf8_seq(const unsigned char *s, size_t n, int *partial);
/* Appends s with every maximal invalid subpart replaced by U+FFFD (as Python and Rust do). */
int tok_utf8_lossy(tok_buf *out, const char *s, size_t n);
int tok_utf8_valid(const char *s, size_t n);
int32_t tok_utf8_decode(const unsigned char *s, size_t n, int *len); /* s valid UTF-8 */
int tok_utf8_encode(uint32_t cp, char out[4]);
int tok_is_whitespace(int32_t cp); /* Unicode White_Space */
int tok_is_alnum(int32_t cp);      /* letters and numbers (Rust char::is_alphanumeric, approx.) */

/* GPT-2 byte-level alphabet: byte -> code point and back (-1 if not in the alphabet). */
uint32_t tok_bytelevel_cp(uint8_t b);
int tok_bytelevel_byte(int32_t cp);

/* ---- pipeline configuration ---- */
typedef enum { TOK_NORM_NFC, TOK_NORM_NFD, TOK_NORM_NFKC, TOK_NORM_NFKD, TOK_NORM_PREPEND,
               TOK_NORM_REPLACE } tok_norm_kind;
typedef struct {
  tok_norm_kind kind;
  char *a, *b; /* PREPEND: a = prefix; REPLACE: a = pattern, b = content */
  size_t alen, blen;
} tok_norm;

typedef enum { TOK_PRE_SPLIT, TOK_PRE_BYTELEVEL } tok_pre_kind;
typedef enum { TOK_SPLIT_ISOLATED, TOK_SPLIT_REMOVED, TOK_SPLIT_MERGED_PREV, TOK_SPLIT_MERGED_NEXT,
               TOK_SPLIT_CONTIGUOUS } tok_split_behavior;
typedef struct {
  tok_pre_kind kind;
  void *re; /* pcre2_code* */
  tok_split_behavior behavior;
  int invert;
  int add_prefix_space, use_regex; /* ByteLevel */
} tok_pre;

typedef enum { TOK_DEC_BYTELEVEL, TOK_DEC_REPLACE, TOK_DEC_BYTEFALLBACK, TOK_DEC_FUSE,
               TOK_DEC_STRIP } tok_dec_kind;
typedef struct {
  tok_dec_kind kind;
  char *a, *b; /* REPLACE: pattern, content; STRIP: a = content char (UTF-8) */
  size_t alen, blen;
  int start, stop; /* STRIP */
} tok_dec;

typedef struct {
  char *content;
  size_t len;
  int32_t id;
  int special, lstrip, rstrip, single_word, normalized;
} tok_added;

/* Added tokens grouped by first byte, longest first, for leftmost-longest matching. */
typedef struct {
  int32_t *idx; /* indices into tokenizer.added */
  char **text;  /* [n] pattern text (normalized content for the normalized matcher) */
  size_t *len;
  int n;
  int32_t start[257];
} tok_matcher;

typedef enum { TOK_MODEL_BPE, TOK_MODEL_SPM } tok_model_kind;

#define TOK_MAX_STEPS 16

struct tokenizer {
  tok_model_kind model;
  int32_t n_ids;        /* one past the largest id (model vocab and added tokens) */
  char **pieces;        /* [n_ids] token text as HF id_to_token gives it (NULL = hole) */
  uint32_t *piece_len;  /* [n_ids] */
  char **mpieces;       /* [n_ids] model vocabulary text (NULL if not in the model) */
  uint32_t *mpiece_len; /* [n_ids] */
  uint8_t *special;     /* [n_ids] 1 for special added tokens */
  float *scores;        /* [n_ids] SPM merge scores, NULL for BPE */
  tok_strmap vocab;     /* model vocabulary */
  tok_mergemap merges;
  int byte_fallback, fuse_unk, ignore_merges;
  int32_t unk_id;
  int32_t byte_ids[256]; /* <0xNN> ids or -1 */

  tok_norm norms[TOK_MAX_STEPS];
  int n_norms;
  tok_pre pres[TOK_MAX_STEPS];
  int n_pres;
  tok_dec decs[TOK_MAX_STEPS];
  int n_decs;
  int has_decoder;
  int dec_bytelevel; /* decoder is ByteLevel alone */
  int dec_fuse;      /* a Fuse step precedes Strip (strip the whole text, not each token) */
  void *re_bytelevel; /* GPT-2 regex for ByteLevel(use_regex = true) */

  tok_added *added;
  int n_added;
  tok_matcher match_raw;  /* added tokens with normalized = false, on the raw text */
  tok_matcher match_norm; /* normalized = true, on normalized text */

  int32_t *prefix_ids, *suffix_ids; /* added by TOK_ADD_SPECIAL */
  int n_prefix, n_suffix;

  int32_t bos_id, eos_id;
  int32_t *eos_ids;
  int n_eos_ids;
  char *bos_token, *eos_token, *chat_template;
};

/* Allocates the id-indexed arrays for n_ids ids. */
int tok_alloc_ids(struct tokenizer *t, int32_t n_ids, int with_scores);
/* Sets model piece id (copied); fails on a duplicate id. */
int tok_set_mpiece(struct tokenizer *t, int32_t id, const char *s, size_t len);
/* Builds the vocabulary map, byte ids, added-token indexes and default piece table. Called by the
 * loaders once every piece, added token and normalizer is known. */
int tok_finalize(struct tokenizer *t, ts_err *err);
/* Compiles an HF-style regex (Oniguruma semantics) with PCRE2. */
int tok_regex_compile(void **out, const char *pattern, size_t len, ts_err *err);
void tok_regex_free(void *re);
/* Applies the normalizer steps to s, writing to out (reset first). */
int tok_normalize(const struct tokenizer *t, const char *s, size_t n, tok_buf *out);
/* BPE / SPM on one pre-tokenized word; appends ids. */
int tok_model_encode(const struct tokenizer *t, const char *w, size_t n, int32_t **ids,
                     size_t *n_ids, size_t *cap);
int tok_push_id(int32_t **ids, size_t *n, size_t *cap, int32_t id);
char *tok_strndup(const char *s, size_t n);

/* Loads tokenizer.json from a buffer (fuzzing entry point); name is used in messages. */
int tok_load_hf_json(struct tokenizer **out, const char *buf, size_t len, const char *name,
                     ts_err *err);

#endif
