/* A model on disk: a Hugging Face directory (config.json + safetensors, single or sharded) or a
 * .gguf file. Opens and validates the containers, maps them read-only, and answers tensor
 * look-ups by name. Every error names the file and, where there is one, the tensor. */
#ifndef TESSERA_MODEL_FILES_H
#define TESSERA_MODEL_FILES_H

#include <stddef.h>
#include <stdint.h>

#include "model/config.h"
#include "model/weights.h"
#include "util/status.h"
#include "util/tensor.h"

typedef enum { MODEL_FMT_HF = 0, MODEL_FMT_GGUF } model_format;

typedef struct model_files model_files;

/* path: a directory with config.json, or a .gguf file. */
int model_files_open(model_files **out, const char *path, ts_err *err);
void model_files_close(model_files *mf);

model_format model_files_format(const model_files *mf);
const char *model_files_path(const model_files *mf);
/* Parsed hyper-parameters (config.json or GGUF metadata, plus generation_config.json). */
const model_config *model_files_config(const model_files *mf);

/* Maps the weights for one shard into w (views into the mapping). Checks every tensor's presence,
 * dtype and shape; a failure names the file and the tensor. w->layers is allocated here and
 * released by model_weights_free. */
int model_files_load_weights(model_files *mf, const model_shard *shard, model_weights *w,
                             ts_err *err);
void model_weights_free(model_weights *w);

/* Looks up a tensor by its name in the file (HF or GGUF naming); TS_ENOTFOUND when absent. */
int model_files_find_tensor(const model_files *mf, const char *name, ts_tensor *out,
                            const char **file_of_tensor);

/* A stable fingerprint of the model (config + tensor table), for the distributed handshake. */
uint64_t model_files_fingerprint(const model_files *mf);

/* GGUF only: the parsed container (tokenizer and chat template live in its metadata), or NULL. */
struct gguf_file;
const struct gguf_file *model_files_gguf(const model_files *mf);

#endif
