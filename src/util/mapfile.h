/* Read-only memory maps of whole files (model weights are used in place, never copied). */
#ifndef TESSERA_MAPFILE_H
#define TESSERA_MAPFILE_H

#include <stddef.h>

#include "util/status.h"

/* Maps path read-only into *map / *size. A file shorter than min_size is TS_EFORMAT with
 * "PATH: truncated (N bytes, <too_short>)". Release with ts_unmap_file. */
int ts_map_file(const char *path, size_t min_size, const char *too_short, const void **map,
                size_t *size, ts_err *err);
void ts_unmap_file(const void *map, size_t size);

#endif
