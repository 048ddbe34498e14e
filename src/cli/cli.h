/* Sub-commands of the tessera executable. Each returns the process exit code. */
#ifndef TESSERA_CLI_H
#define TESSERA_CLI_H

int cmd_generate(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_serve(int argc, char **argv);
int cmd_worker(int argc, char **argv);
int cmd_bench(int argc, char **argv);

#endif
