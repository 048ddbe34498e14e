/* Tokenizers with exact parity to Hugging Face `tokenizers`: byte-level BPE (Qwen2/Qwen3,
 * Llama 3), SentencePiece-style BPE with byte fallback (Llama 2, stories260K), from
 * tokenizer.json (+ tokenizer_config.json, generation_config.json) or GGUF metadata. */
#ifndef TESSERA_TOKENIZER_H
#define TESSERA_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "util/status.h"

struct gguf_file;
typedef struct tokenizer tokenizer;

/* dir holds tokenizer.json and, optionally, tokenizer_config.json / generation_config.json. */
int tok_load_hf(tokenizer **out, const char *dir, ts_err *err);
/* From a GGUF file's tokenizer.ggml.* metadata ("llama" and "gpt2" vocabularies). */
int tok_load_gguf(tokenizer **out, const struct gguf_file *g, ts_err *err);
/* path: a .gguf file, or a directory with tokenizer.json (a model directory or a tokenizer-only
 * one). */
int tok_load_path(tokenizer **out, const char *path, ts_err *err);
void tok_free(tokenizer *t);

enum {
  TOK_ADD_SPECIAL = 1,   /* add BOS/EOS as the tokenizer config says */
  TOK_PARSE_SPECIAL = 2, /* match added/special tokens written in the text */
};

/* Encodes len bytes of text. *ids is malloc'ed (caller frees). */
int tok_encode(const tokenizer *t, const char *text, size_t len, int flags, int32_t **ids,
               size_t *n_ids, ts_err *err);
/* Decodes ids to text (NUL-terminated, malloc'ed). skip_special drops special tokens. */
int tok_decode(const tokenizer *t, const int32_t *ids, size_t n_ids, int skip_special, char **text,
               size_t *len, ts_err *err);

int tok_vocab_size(const tokenizer *t);
int tok_bos_id(const tokenizer *t); /* -1 if none */
int tok_eos_id(const tokenizer *t); /* -1 if none; the primary EOS */
/* Every id that ends generation (tokenizer EOS plus generation_config eos_token_id list). */
int tok_eos_ids(const tokenizer *t, const int32_t **ids);
int tok_is_special(const tokenizer *t, int32_t id);
/* The model's chat template (tokenizer_config.json chat_template or GGUF metadata), or NULL. */
const char *tok_chat_template(const tokenizer *t);
/* Token text of id as stored in the vocabulary (for logprobs), NULL if out of range. */
const char *tok_piece(const tokenizer *t, int32_t id);
/* The BOS / EOS token strings from the config (for chat templates), or NULL. */
const char *tok_bos_token(const tokenizer *t);
const char *tok_eos_token(const tokenizer *t);

/* Incremental decoding for streaming: feed ids one at a time; emits only complete UTF-8 text,
 * identical in total to tok_decode of all ids. */
typedef struct tok_stream tok_stream;
int tok_stream_create(tok_stream **out, const tokenizer *t, int skip_special);
/* Appends id; *text (owned by the stream, valid until the next call) receives the new text. */
int tok_stream_push(tok_stream *s, int32_t id, const char **text, size_t *len);
/* Flushes whatever is left at the end (incomplete UTF-8 becomes U+FFFD as HF does). */
int tok_stream_flush(tok_stream *s, const char **text, size_t *len);
void tok_stream_free(tok_stream *s);

#endif
