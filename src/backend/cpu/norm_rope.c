/* CPU RMSNorm (plain and fused with the residual add) and rotary position embeddings. RoPE
 * angles follow Hugging Face's float32 arithmetic (inv_freq = 1 / theta^(2i/hd), angle = pos *
 * inv_freq) so logits match the reference at long positions; cos/sin are computed once per step
 * for the staged positions and reused by every layer. */
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_backend.h"

/* ---- rmsnorm --------------------------------------------------------------------------- */

typedef struct {
  cpu_ctx *c;
  float *residual;    /* [rows][dim] or NULL */
  const float *x;     /* [rows][dim] */
  const ts_tensor *w; /* [dim] */
  float eps;
  int dim;
  float *out;         /* [rows][dim] */
} norm_job;

static void norm_rows(void *arg, int64_t r0, int64_t r1, int thread) {
  norm_job *j = arg;
  const int dim = j->dim;
  float *wf = cpu_scratch(j->c, thread); /* [dim] widened weight */
  cpu_row_to_f32(j->c, j->w->dtype, j->w->data, dim, wf);
  for (int64_t r = r0; r < r1; r++) {
    const float *xr = j->x + (size_t)r * dim;
    float *out = j->out + (size_t)r * dim;
    if (j->residual) {
      float *res = j->residual + (size_t)r * dim;
      for (int i = 0; i < dim; i++) res[i] += xr[i];
      xr = res;
    }
    double ss = 0; /* double: the mean of squares of a wide row must not lose small terms */
    for (int i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
    float inv = (float)(1.0 / sqrt(ss / dim + (double)j->eps));
    for (int i = 0; i < dim; i++) out[i] = (xr[i] * inv) * wf[i];
  }
}

static void norm_run(cpu_ctx *c, float *residual, const float *x, const ts_tensor *w, float eps,
                     int rows, int dim, float *out) {
  if (rows <= 0) return;
  if (cpu_scratch_reserve(c, (size_t)dim) < 0) {
    for (size_t i = 0; i < (size_t)rows * (size_t)dim; i++) out[i] = NAN;
    return;
  }
  norm_job j = {c, residual, x, w, eps, dim, out};
  threadpool_parallel_for(c->pool, rows, 8, norm_rows, &j);
}

void cpu_rmsnorm(void *ctx, const float *x, const ts_tensor *w, float eps, int rows, int dim,
                 float *out) {
  norm_run(ctx, NULL, x, w, eps, rows, dim, out);
}

void cpu_add_rmsnorm(void *ctx, float *residual, const float *x, const ts_tensor *w, float eps,
                     int rows, int dim, float *out) {
  norm_run(ctx, residual, x, w, eps, rows, dim, out);
}

/* ---- rope ------------------------------------------------------------------------------ */

/* Inverse frequency of pair i of a head of hd dims, with llama3 scaling when asked. */
static float rope_inv_freq(const rope_params *rp, int i, int hd) {
  float inv = 1.0f / powf(rp->theta, (float)(2 * i) / (float)hd);
  if (rp->scaling == ROPE_SCALING_LLAMA3 && rp->factor > 0) {
    const float pi = 3.14159265358979323846f;
    float low_wl = (float)rp->orig_max_pos / rp->low_freq_factor;
    float high_wl = (float)rp->orig_max_pos / rp->high_freq_factor;
    float wl = 2 * pi / inv;
    if (wl > low_wl) {
      inv = inv / rp->factor;
    } else if (wl >= high_wl) {
      float smooth = ((float)rp->orig_max_pos / wl - rp->low_freq_factor) /
                     (rp->high_freq_factor - rp->low_freq_factor);
      inv = (1 - smooth) * inv / rp->factor + smooth * inv;
    }
  }
  return inv;
}

typedef struct {
  cpu_ctx *c;
  float *x; /* [n_tokens][heads][hd] */
  int heads, hd;
  const rope_params *rp;
  const float *inv; /* [hd/2] */
} rope_job;

static void rope_tables(void *arg, int64_t t0, int64_t t1, int thread) {
  (void)thread;
  rope_job *j = arg;
  int half = j->hd / 2;
  for (int64_t t = t0; t < t1; t++) {
    float p = (float)j->c->pos[t];
    for (int i = 0; i < half; i++) {
      float a = p * j->inv[i];
      j->c->rope_cos[t * half + i] = cosf(a);
      j->c->rope_sin[t * half + i] = sinf(a);
    }
  }
}

static void rope_tokens(void *arg, int64_t t0, int64_t t1, int thread) {
  (void)thread;
  rope_job *j = arg;
  const int hd = j->hd, half = hd / 2;
  const int inter = j->rp->interleaved;
  for (int64_t t = t0; t < t1; t++) {
    const float *cs = j->c->rope_cos + t * half, *sn = j->c->rope_sin + t * half;
    for (int h = 0; h < j->heads; h++) {
      float *v = j->x + ((size_t)t * j->heads + h) * hd;
      for (int i = 0; i < half; i++) {
        /* NEOX pairs element i with i + hd/2; interleaved (GPT-J) pairs 2i with 2i+1. */
        int a = inter ? 2 * i : i, b = inter ? 2 * i + 1 : i + half;
        float x0 = v[a], x1 = v[b];
        v[a] = x0 * cs[i] - x1 * sn[i];
        v[b] = x1 * cs[i] + x0 * sn[i];
      }
    }
  }
}

void cpu_rope(void *ctx, float *x, int heads, int hd, const rope_params *rp) {
  cpu_ctx *c = ctx;
  if (c->n_tokens <= 0 || hd < 2) return;
  int half = hd / 2;
  rope_job j = {c, x, heads, hd, rp, NULL};
  const rope_params *k = &c->rope_key;
  int same = c->rope_valid && c->rope_hd == hd && k->theta == rp->theta &&
             k->interleaved == rp->interleaved && k->scaling == rp->scaling &&
             k->factor == rp->factor && k->low_freq_factor == rp->low_freq_factor &&
             k->high_freq_factor == rp->high_freq_factor && k->orig_max_pos == rp->orig_max_pos;
  if (!same) {
    float inv[1024];
    size_t need = (size_t)c->n_tokens * (size_t)half;
    if (half > 1024 || cpu_rope_reserve(c, need) < 0) {
      /* Unreachable with a validated config; poison rather than leave q/k unrotated. */
      for (size_t i = 0; i < (size_t)c->n_tokens * (size_t)heads * (size_t)hd; i++) x[i] = NAN;
      return;
    }
    for (int i = 0; i < half; i++) inv[i] = rope_inv_freq(rp, i, hd);
    j.inv = inv;
    threadpool_parallel_for(c->pool, c->n_tokens, 16, rope_tables, &j);
    c->rope_valid = 1;
    c->rope_hd = hd;
    c->rope_key = *rp;
    j.inv = NULL;
  }
  threadpool_parallel_for(c->pool, c->n_tokens, 4, rope_tokens, &j);
}
