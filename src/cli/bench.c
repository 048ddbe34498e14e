/* tessera bench: not built yet. */
#include <stdio.h>

#include "cli/cli.h"

int cmd_bench(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fprintf(stderr, "tessera bench: not available in this build yet\n");
  return 1;
}
