/* tessera: dispatches to a sub-command. */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "util/log.h"

typedef struct {
  const char *name;
  int (*run)(int argc, char **argv);
  const char *help;
} command;

static const command commands[] = {
    {"serve", cmd_serve, "serve a model behind an OpenAI-compatible HTTP API"},
    {"generate", cmd_generate, "generate text from a prompt"},
    {"tokenize", cmd_tokenize, "encode text to token ids or decode ids to text"},
    {"bench", cmd_bench, "measure prefill and decode speed"},
    {"worker", cmd_worker, "run one distributed worker (started by the executor)"},
};

static void usage(FILE *f) {
  fprintf(f, "usage: tessera COMMAND [options]\n\ncommands:\n");
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
  fprintf(f, "\n'tessera COMMAND --help' shows a command's options.\n");
}

int main(int argc, char **argv) {
  log_init_from_env();
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
    usage(stdout);
    return 0;
  }
  if (!strcmp(argv[1], "--version")) {
    printf("tessera 0.1.0\n");
    return 0;
  }
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (!strcmp(argv[1], commands[i].name)) return commands[i].run(argc - 1, argv + 1);
  fprintf(stderr, "tessera: unknown command '%s'\n", argv[1]);
  usage(stderr);
  return 2;
}
