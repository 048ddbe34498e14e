/* The comm lifecycle shared by every implementation. */
#include "dist/comm.h"

void comm_destroy(comm *c) {
  if (c && c->ops && c->ops->destroy) c->ops->destroy(c);
}
