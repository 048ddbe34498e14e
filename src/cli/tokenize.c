/* tessera tokenize: not built yet. */
#include <stdio.h>

#include "cli/cli.h"

int cmd_tokenize(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fprintf(stderr, "tessera tokenize: not available in this build yet\n");
  return 1;
}
