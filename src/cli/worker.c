/* tessera worker: not built yet. */
#include <stdio.h>

#include "cli/cli.h"

int cmd_worker(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fprintf(stderr, "tessera worker: not available in this build yet\n");
  return 1;
}
