/* Hugging Face hub downloads into the standard cache layout:
 *   $HF_HUB_CACHE (default $HF_HOME/hub, HF_HOME default ~/.cache/huggingface)
 *     models--OWNER--NAME/blobs/<etag>             file contents
 *     models--OWNER--NAME/refs/<revision>          commit hash the revision pointed to
 *     models--OWNER--NAME/snapshots/<commit>/<f>   symlink to ../../blobs/<etag>
 * so that files fetched here and by huggingface_hub are shared. Only the files tessera reads are
 * fetched: config, tokenizer, generation config and the safetensors weights (or one .gguf). */
#include "hub/hub.h"

#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util/log.h"

#define HUB_DEFAULT_ENDPOINT "https://huggingface.co"

typedef struct {
  char endpoint[512];
  char token[512];     /* empty when HF_TOKEN is unset */
  char repo_dir[PATH_MAX];
  const char *repo;    /* OWNER/NAME */
  const char *revision;
  int offline;
  int progress;
} hub_ctx;

/* A file to fetch and what the hub says about it. */
typedef struct {
  char name[256];
  char blob[128];      /* LFS sha256 or git blob id: the cache's blob file name */
  int64_t size;        /* -1 when unknown */
} hub_file;

/* snprintf for paths: 0, or -1 when the result would not fit. */
static int pathf(char *out, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int pathf(char *out, size_t cap, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(out, cap, fmt, ap);
  va_end(ap);
  return (n < 0 || (size_t)n >= cap) ? -1 : 0;
}

static int path_exists(const char *p) {
  struct stat st;
  return stat(p, &st) == 0;
}

static int mkdirs(const char *path) {
  char tmp[PATH_MAX];
  size_t n = strlen(path);
  if (n >= sizeof tmp) return -1;
  memcpy(tmp, path, n + 1);
  for (char *p = tmp + 1; *p; p++) {
    if (*p != '/') continue;
    *p = '\0';
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return -1;
    *p = '/';
  }
  return (mkdir(tmp, 0755) != 0 && errno != EEXIST) ? -1 : 0;
}

/* "owner/name": one slash, no path-like pieces. */
static int looks_like_repo_id(const char *s) {
  const char *slash = strchr(s, '/');
  if (!slash || slash == s || !slash[1] || strchr(slash + 1, '/')) return 0;
  if (s[0] == '.' || strstr(s, "..")) return 0;
  for (const char *p = s; *p; p++)
    if (!(('a' <= *p && *p <= 'z') || ('A' <= *p && *p <= 'Z') || ('0' <= *p && *p <= '9') ||
          *p == '-' || *p == '_' || *p == '.' || *p == '/'))
      return 0;
  return 1;
}

static int is_commit_hash(const char *s) {
  if (strlen(s) != 40) return 0;
  for (const char *p = s; *p; p++)
    if (!(('0' <= *p && *p <= '9') || ('a' <= *p && *p <= 'f'))) return 0;
  return 1;
}

/* ---- HTTP ---------------------------------------------------------------------------------- */

typedef struct {
  char *data;
  size_t len, cap;
  size_t limit;
} mem_buf;

static size_t mem_write(char *ptr, size_t size, size_t nmemb, void *user) {
  mem_buf *b = user;
  size_t n = size * nmemb;
  if (b->len + n + 1 > b->limit) return 0; /* abort: a metadata reply this big is not sane */
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 4096;
    while (cap < b->len + n + 1) cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d) return 0;
    b->data = d;
    b->cap = cap;
  }
  memcpy(b->data + b->len, ptr, n);
  b->len += n;
  b->data[b->len] = '\0';
  return n;
}

static struct curl_slist *auth_headers(const hub_ctx *h) {
  struct curl_slist *hdr = NULL;
  if (h->token[0]) {
    char line[600];
    snprintf(line, sizeof line, "Authorization: Bearer %s", h->token);
    hdr = curl_slist_append(hdr, line);
  }
  return curl_slist_append(hdr, "User-Agent: tessera/0.1");
}

static void curl_common(CURL *c, const char *url, struct curl_slist *hdr) {
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 15L);
  /* Abort a transfer that moves under 1 byte/s for 60 s rather than hanging forever. */
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, 60L);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
}

static int http_status_error(const hub_ctx *h, long status, const char *what, ts_err *err) {
  if (status == 401 || status == 403)
    return ts_errorf(err, TS_ENET,
                     "%s: access denied by %s (HTTP %ld): the repository may be gated or "
                     "private; set HF_TOKEN to a token that can read it",
                     what, h->endpoint, status);
  if (status == 404)
    return ts_errorf(err, TS_ENOTFOUND, "%s: not found on %s (HTTP 404): check the model id and "
                     "--revision", what, h->endpoint);
  return ts_errorf(err, TS_ENET, "%s: HTTP %ld from %s", what, status, h->endpoint);
}

/* GET url into memory (metadata only, at most 64 MiB). */
static int http_get_json(const hub_ctx *h, const char *url, const char *what, json_t **out,
                         ts_err *err) {
  CURL *c = curl_easy_init();
  if (!c) return ts_errorf(err, TS_ENOMEM, "curl_easy_init failed");
  struct curl_slist *hdr = auth_headers(h);
  mem_buf b = {.limit = 64u << 20};
  curl_common(c, url, hdr);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, mem_write);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
  curl_easy_setopt(c, CURLOPT_TIMEOUT, 120L);
  CURLcode rc = curl_easy_perform(c);
  long status = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  curl_slist_free_all(hdr);
  curl_easy_cleanup(c);
  int ret = 0;
  if (rc != CURLE_OK) {
    ret = ts_errorf(err, TS_ENET, "%s: cannot reach %s: %s", what, h->endpoint,
                    curl_easy_strerror(rc));
  } else if (status != 200) {
    ret = http_status_error(h, status, what, err);
  } else {
    json_error_t je;
    *out = json_loadb(b.data ? b.data : "", b.len, 0, &je);
    if (!*out) ret = ts_errorf(err, TS_EPROTO, "%s: the hub's reply is not JSON: %s", what, je.text);
  }
  free(b.data);
  return ret;
}

/* ---- progress bar -------------------------------------------------------------------------- */

typedef struct {
  const char *name;
  int64_t base;   /* bytes already on disk before this transfer (resume) */
  int64_t total;  /* expected size, -1 if unknown */
  double last_draw;
  int enabled;
} progress_state;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void progress_draw(progress_state *p, int64_t done, int final) {
  if (!p->enabled) return;
  double t = now_s();
  if (!final && t - p->last_draw < 0.1) return;
  p->last_draw = t;
  int64_t have = p->base + done;
  if (p->total > 0) {
    int width = 30, fill = (int)(width * (double)have / (double)p->total);
    if (fill > width) fill = width;
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < fill ? '#' : '.';
    bar[width] = '\0';
    fprintf(stderr, "\r%-32.32s [%s] %6.1f / %.1f MB", p->name, bar, have / 1e6, p->total / 1e6);
  } else {
    fprintf(stderr, "\r%-32.32s %6.1f MB", p->name, have / 1e6);
  }
  if (final) fputc('\n', stderr);
  fflush(stderr);
}

static int progress_cb(void *user, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                       curl_off_t ulnow) {
  (void)dltotal;
  (void)ultotal;
  (void)ulnow;
  progress_draw(user, (int64_t)dlnow, 0);
  return 0;
}

/* ---- one file ------------------------------------------------------------------------------ */

static int64_t file_size(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 ? (int64_t)st.st_size : -1;
}

/* Downloads f into blobs/<blob> (resuming blobs/<blob>.incomplete) and links it into the
 * snapshot directory. */
static int fetch_file(const hub_ctx *h, const char *commit, const hub_file *f, ts_err *err) {
  char blob_path[PATH_MAX], part_path[PATH_MAX], link_path[PATH_MAX], target[PATH_MAX];
  if (pathf(blob_path, sizeof blob_path, "%s/blobs/%s", h->repo_dir, f->blob) ||
      pathf(part_path, sizeof part_path, "%s.incomplete", blob_path) ||
      pathf(link_path, sizeof link_path, "%s/snapshots/%s/%s", h->repo_dir, commit, f->name))
    return ts_errorf(err, TS_ERANGE, "%s: cache path too long", f->name);

  int64_t have = file_size(blob_path);
  if (have < 0 || (f->size >= 0 && have != f->size)) {
    if (have >= 0) {
      LOG_W("%s: cached blob has %lld bytes, expected %lld; downloading again", f->name,
            (long long)have, (long long)f->size);
      unlink(blob_path);
    }
    char url[2048];
    if (pathf(url, sizeof url, "%s/%s/resolve/%s/%s", h->endpoint, h->repo, commit, f->name))
      return ts_errorf(err, TS_ERANGE, "%s: URL too long", f->name);
    int64_t partial = file_size(part_path);
    if (partial < 0 || (f->size >= 0 && partial > f->size)) {
      unlink(part_path);
      partial = 0;
    }
    FILE *out = fopen(part_path, partial > 0 ? "ab" : "wb");
    if (!out) return ts_errorf(err, TS_EIO, "%s: cannot write %s: %s", f->name, part_path,
                               strerror(errno));
    CURL *c = curl_easy_init();
    struct curl_slist *hdr = auth_headers(h);
    progress_state ps = {.name = f->name, .base = partial, .total = f->size,
                         .enabled = h->progress};
    curl_common(c, url, hdr);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, out); /* default write callback: fwrite */
    curl_easy_setopt(c, CURLOPT_FAILONERROR, 1L);
    if (partial > 0) {
      curl_easy_setopt(c, CURLOPT_RESUME_FROM_LARGE, (curl_off_t)partial);
      LOG_I("%s: resuming at byte %lld", f->name, (long long)partial);
    }
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, progress_cb);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, &ps);
    CURLcode rc = curl_easy_perform(c);
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(hdr);
    curl_easy_cleanup(c);
    int close_failed = fclose(out) != 0;
    if (rc == CURLE_HTTP_RETURNED_ERROR) return http_status_error(h, status, f->name, err);
    if (rc != CURLE_OK)
      return ts_errorf(err, TS_ENET, "%s: download from %s failed: %s (the partial file is kept; "
                       "run again to resume)", f->name, h->endpoint, curl_easy_strerror(rc));
    if (close_failed) return ts_errorf(err, TS_EIO, "%s: cannot write %s", f->name, part_path);
    progress_draw(&ps, file_size(part_path) - partial, 1);
    int64_t got = file_size(part_path);
    if (f->size >= 0 && got != f->size) {
      if (got > f->size) unlink(part_path);
      return ts_errorf(err, TS_ENET, "%s: downloaded %lld bytes, the hub says %lld; run again to "
                       "resume", f->name, (long long)got, (long long)f->size);
    }
    if (rename(part_path, blob_path) != 0)
      return ts_errorf(err, TS_EIO, "%s: cannot rename %s: %s", f->name, part_path,
                       strerror(errno));
  }

  /* The snapshot entry links to the blob with a relative path, as huggingface_hub does. */
  char link_dir[PATH_MAX];
  memcpy(link_dir, link_path, sizeof link_dir);
  char *slash = strrchr(link_dir, '/');
  if (slash) *slash = '\0';
  if (mkdirs(link_dir) != 0)
    return ts_errorf(err, TS_EIO, "cannot create %s: %s", link_dir, strerror(errno));
  int depth = 2;
  for (const char *p = f->name; *p; p++) depth += *p == '/';
  target[0] = '\0';
  for (int i = 0; i < depth; i++) strcat(target, "../");
  strcat(target, "blobs/");
  strcat(target, f->blob);
  unlink(link_path);
  if (symlink(target, link_path) != 0)
    return ts_errorf(err, TS_EIO, "cannot link %s: %s", link_path, strerror(errno));
  return 0;
}

/* ---- which files ---------------------------------------------------------------------------- */

static const char *const k_meta_files[] = {"config.json", "generation_config.json",
                                           "tokenizer.json", "tokenizer_config.json",
                                           "special_tokens_map.json",
                                           "model.safetensors.index.json", "model.safetensors"};

static int has_suffix(const char *s, const char *suf) {
  size_t n = strlen(s), m = strlen(suf);
  return n >= m && !strcmp(s + n - m, suf);
}

static int is_wanted(const char *name, json_t *siblings) {
  for (size_t i = 0; i < sizeof k_meta_files / sizeof k_meta_files[0]; i++)
    if (!strcmp(name, k_meta_files[i])) return 1;
  /* Sharded weights. */
  if (!strncmp(name, "model-", 6) && has_suffix(name, ".safetensors") && !strchr(name, '/'))
    return 1;
  /* A GGUF repository: take its .gguf only when there are no safetensors weights at all. */
  if (has_suffix(name, ".gguf") && !strchr(name, '/')) {
    size_t i;
    json_t *s;
    json_array_foreach(siblings, i, s) {
      const char *n = json_string_value(json_object_get(s, "rfilename"));
      if (n && has_suffix(n, ".safetensors")) return 0;
    }
    return 1;
  }
  return 0;
}

/* Fills files[] from the model-info reply's siblings; returns how many. */
static int collect_files(json_t *info, hub_file *files, int cap, ts_err *err) {
  json_t *siblings = json_object_get(info, "siblings");
  if (!json_is_array(siblings))
    return ts_errorf(err, TS_EPROTO, "the hub's model info has no file list");
  int n = 0, n_gguf = 0;
  size_t i;
  json_t *s;
  json_array_foreach(siblings, i, s) {
    const char *name = json_string_value(json_object_get(s, "rfilename"));
    if (!name || !is_wanted(name, siblings)) continue;
    if (has_suffix(name, ".gguf") && n_gguf++) continue; /* one .gguf is enough */
    if (n == cap) return ts_errorf(err, TS_ERANGE, "too many files in the repository");
    hub_file *f = &files[n];
    snprintf(f->name, sizeof f->name, "%s", name);
    json_t *lfs = json_object_get(s, "lfs");
    const char *sha = json_string_value(json_object_get(lfs, "sha256"));
    const char *blob = json_string_value(json_object_get(s, "blobId"));
    json_t *size = json_object_get(s, "size");
    if (!json_is_integer(size)) size = json_object_get(lfs, "size");
    f->size = json_is_integer(size) ? json_integer_value(size) : -1;
    const char *id = sha ? sha : blob;
    if (!id) return ts_errorf(err, TS_EPROTO, "%s: the hub gives no blob id", name);
    for (const char *p = id; *p; p++)
      if (!(('0' <= *p && *p <= '9') || ('a' <= *p && *p <= 'f') || ('A' <= *p && *p <= 'F')))
        return ts_errorf(err, TS_EPROTO, "%s: the hub's blob id is not hexadecimal", name);
    snprintf(f->blob, sizeof f->blob, "%s", id);
    n++;
  }
  if (n == 0)
    return ts_errorf(err, TS_ENOTFOUND, "the repository has none of the files tessera reads "
                     "(config.json, tokenizer.json, *.safetensors, *.gguf)");
  return n;
}

/* ---- resolve -------------------------------------------------------------------------------- */

static int read_ref(const hub_ctx *h, char *commit, size_t cap) {
  if (is_commit_hash(h->revision)) {
    snprintf(commit, cap, "%s", h->revision);
    return 0;
  }
  char path[PATH_MAX];
  if (pathf(path, sizeof path, "%s/refs/%s", h->repo_dir, h->revision)) return -1;
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  char line[128] = {0};
  int ok = fgets(line, sizeof line, f) != NULL;
  fclose(f);
  line[strcspn(line, "\r\n")] = '\0';
  if (!ok || !is_commit_hash(line)) return -1;
  snprintf(commit, cap, "%s", line);
  return 0;
}

static int snapshot_path(const hub_ctx *h, const char *commit, char *out, size_t cap,
                         ts_err *err) {
  if (pathf(out, cap, "%s/snapshots/%s", h->repo_dir, commit))
    return ts_errorf(err, TS_ERANGE, "cache path too long");
  return 0;
}

static int resolve_offline(const hub_ctx *h, char *out, size_t cap, const char *why,
                           ts_err *err) {
  char commit[64];
  if (read_ref(h, commit, sizeof commit) != 0)
    return ts_errorf(err, TS_ENOTFOUND, "revision '%s' is not in the cache (%s)%s", h->revision,
                     h->repo_dir, why);
  TS_TRY(snapshot_path(h, commit, out, cap, err));
  if (!path_exists(out))
    return ts_errorf(err, TS_ENOTFOUND, "snapshot %s is missing from the cache%s", commit, why);
  return 0;
}

static int hub_download(hub_ctx *h, char *out, size_t cap, ts_err *err) {
  char url[2048];
  if (pathf(url, sizeof url, "%s/api/models/%s/revision/%s?blobs=true", h->endpoint, h->repo,
            h->revision))
    return ts_errorf(err, TS_ERANGE, "URL too long");
  json_t *info = NULL;
  ts_err net_err = {0};
  int rc = http_get_json(h, url, "model info", &info, &net_err);
  if (rc == TS_ENET && strstr(net_err.msg, "cannot reach")) {
    /* huggingface_hub falls back to the cache when the hub is unreachable; so do we. */
    if (resolve_offline(h, out, cap, "", NULL) == 0) {
      LOG_W("%s; using the cached snapshot", net_err.msg);
      return 0;
    }
  }
  if (rc < 0) {
    if (err) *err = net_err;
    return rc;
  }
  const char *sha = json_string_value(json_object_get(info, "sha"));
  if (!sha || !is_commit_hash(sha)) {
    json_decref(info);
    return ts_errorf(err, TS_EPROTO, "the hub's model info has no commit hash");
  }
  char commit[64];
  snprintf(commit, sizeof commit, "%s", sha);
  enum { MAX_FILES = 256 };
  hub_file *files = calloc(MAX_FILES, sizeof *files);
  if (!files) {
    json_decref(info);
    return ts_errorf(err, TS_ENOMEM, "out of memory");
  }
  int n = collect_files(info, files, MAX_FILES, err);
  json_decref(info);
  char dir[PATH_MAX];
  if (n >= 0 && pathf(dir, sizeof dir, "%s/blobs", h->repo_dir))
    n = ts_errorf(err, TS_ERANGE, "cache path too long");
  if (n >= 0 && mkdirs(dir) != 0) n = ts_errorf(err, TS_EIO, "cannot create %s: %s", dir,
                                                 strerror(errno));
  for (int i = 0; i < n; i++) {
    rc = fetch_file(h, commit, &files[i], err);
    if (rc < 0) {
      n = rc;
      break;
    }
  }
  free(files);
  if (n < 0) return n;
  if (!is_commit_hash(h->revision)) {
    char ref[PATH_MAX];
    if (pathf(ref, sizeof ref, "%s/refs/%s", h->repo_dir, h->revision))
      return ts_errorf(err, TS_ERANGE, "cache path too long");
    char *slash = strrchr(ref, '/');
    *slash = '\0';
    if (mkdirs(ref) != 0) return ts_errorf(err, TS_EIO, "cannot create %s", ref);
    *slash = '/';
    FILE *f = fopen(ref, "w");
    if (!f || fputs(commit, f) < 0 || fclose(f) != 0)
      return ts_errorf(err, TS_EIO, "cannot write %s", ref);
  }
  return snapshot_path(h, commit, out, cap, err);
}

int hub_resolve(const char *model, const hub_options *opt, char *out, size_t cap, ts_err *err) {
  if (!model || !*model) return ts_errorf(err, TS_EINVAL, "no model given");
  if (path_exists(model) || !looks_like_repo_id(model)) {
    if (!path_exists(model))
      return ts_errorf(err, TS_ENOTFOUND, "%s: no such file or directory (nor a hub id of the "
                       "form OWNER/NAME)", model);
    int n = snprintf(out, cap, "%s", model);
    return (n < 0 || (size_t)n >= cap) ? ts_errorf(err, TS_ERANGE, "path too long") : 0;
  }

  hub_ctx h = {.repo = model, .revision = "main", .progress = 0};
  if (opt && opt->revision && *opt->revision) h.revision = opt->revision;
  if (strstr(h.revision, "..") || h.revision[0] == '/')
    return ts_errorf(err, TS_EINVAL, "bad revision '%s'", h.revision);
  const char *ep = getenv("HF_ENDPOINT");
  snprintf(h.endpoint, sizeof h.endpoint, "%s", ep && *ep ? ep : HUB_DEFAULT_ENDPOINT);
  size_t el = strlen(h.endpoint);
  while (el > 0 && h.endpoint[el - 1] == '/') h.endpoint[--el] = '\0';
  const char *tok = getenv("HF_TOKEN");
  if (tok) snprintf(h.token, sizeof h.token, "%s", tok);
  const char *off = getenv("HF_HUB_OFFLINE");
  h.offline = off && *off && strcmp(off, "0") && strcasecmp(off, "false");
  h.progress = opt && opt->progress && isatty(STDERR_FILENO);

  char cache[PATH_MAX];
  const char *hub_cache = getenv("HF_HUB_CACHE");
  const char *hf_home = getenv("HF_HOME");
  const char *home = getenv("HOME");
  int bad;
  if (hub_cache && *hub_cache) bad = pathf(cache, sizeof cache, "%s", hub_cache);
  else if (hf_home && *hf_home) bad = pathf(cache, sizeof cache, "%s/hub", hf_home);
  else bad = pathf(cache, sizeof cache, "%s/.cache/huggingface/hub", home ? home : ".");
  if (bad) return ts_errorf(err, TS_ERANGE, "cache path too long");
  const char *slash = strchr(model, '/');
  if (pathf(h.repo_dir, sizeof h.repo_dir, "%s/models--%.*s--%s", cache, (int)(slash - model),
            model, slash + 1))
    return ts_errorf(err, TS_ERANGE, "cache path too long");

  int rc;
  if (h.offline) {
    rc = resolve_offline(&h, out, cap, "; HF_HUB_OFFLINE is set, so nothing is downloaded", err);
    if (rc < 0) ts_err_prefix(err, "%s", model);
    return rc;
  }

  static int curl_ready = 0;
  if (!curl_ready) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
      return ts_errorf(err, TS_ENET, "curl_global_init failed");
    curl_ready = 1;
  }
  rc = hub_download(&h, out, cap, err);
  if (rc < 0) ts_err_prefix(err, "%s", model);
  return rc;
}
