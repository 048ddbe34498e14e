/* Read-only whole-file mappings. */
#include "util/mapfile.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int ts_map_file(const char *path, size_t min_size, const char *too_short, const void **map,
                size_t *size, ts_err *err) {
  *map = NULL;
  *size = 0;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ts_errorf(err, TS_EIO, "%s: cannot open (%s)", path, strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) < 0) {
    int e = errno;
    close(fd);
    return ts_errorf(err, TS_EIO, "%s: cannot stat (%s)", path, strerror(e));
  }
  size_t n = (size_t)sb.st_size;
  if (n < min_size) {
    close(fd);
    return ts_errorf(err, TS_EFORMAT, "%s: truncated (%zu bytes, %s)", path, n, too_short);
  }
  void *m = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, 0);
  int e = errno;
  close(fd);
  if (m == MAP_FAILED) return ts_errorf(err, TS_EIO, "%s: cannot map (%s)", path, strerror(e));
  *map = m;
  *size = n;
  return TS_OK;
}

void ts_unmap_file(const void *map, size_t size) {
  if (map) munmap((void *)map, size);
}
