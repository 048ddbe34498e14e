/* engine_create over an in-process model: the uni executor. Kept apart from engine.c so that the
 * engine core links without the model (tests drive it over other executors). */
#include "dist/executor.h"
#include "engine/engine.h"

int engine_create(engine **out, struct model *m, const struct tokenizer *tok,
                  const engine_config *cfg, ts_err *err) {
  *out = NULL;
  executor *ex;
  TS_TRY(executor_uni_create(&ex, m, err));
  return engine_create_with_executor(out, ex, tok, cfg, err);
}
