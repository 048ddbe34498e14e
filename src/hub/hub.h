/* Hugging Face hub ids: resolves "owner/name" to a local snapshot directory in the standard cache
 * layout under $HF_HOME/hub (default ~/.cache/huggingface/hub), downloading the files tessera
 * needs from $HF_ENDPOINT (default https://huggingface.co) with libcurl. Honours HF_TOKEN and
 * HF_HUB_OFFLINE; resumes partial downloads and verifies sizes. */
#ifndef TESSERA_HUB_H
#define TESSERA_HUB_H

#include <stddef.h>

#include "util/status.h"

typedef struct {
  const char *revision; /* branch, tag or commit; NULL = "main" */
  int progress;         /* draw a progress bar on stderr when it is a terminal */
} hub_options;

/* If model names an existing file or directory, copies it to out. Otherwise treats it as a hub id
 * and writes the local snapshot directory to out. */
int hub_resolve(const char *model, const hub_options *opt, char *out, size_t cap, ts_err *err);

#endif
