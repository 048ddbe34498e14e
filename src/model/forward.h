/* Activation buffers of the forward pass (forward.c), created once per model for max_tokens.
 * model_load calls these; tests that assemble a model from their own weights call them too. */
#ifndef TESSERA_FORWARD_H
#define TESSERA_FORWARD_H

#include "model/model.h"

/* Sizes and allocates m->scratch on m->be for m->max_tokens from m->cfg, m->shard and m->w. */
int forward_scratch_create(model *m, ts_err *err);
void forward_scratch_free(model *m);

#endif
