/* tessera generate: not built yet. */
#include <stdio.h>

#include "cli/cli.h"

int cmd_generate(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fprintf(stderr, "tessera generate: not available in this build yet\n");
  return 1;
}
