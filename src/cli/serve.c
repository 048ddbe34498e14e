/* tessera serve: not built yet. */
#include <stdio.h>

#include "cli/cli.h"

int cmd_serve(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fprintf(stderr, "tessera serve: not available in this build yet\n");
  return 1;
}
