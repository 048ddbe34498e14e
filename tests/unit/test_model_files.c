/* Model files on the shared stories260K model: HF config and weights, the GGUF conversion of the
 * same weights (q/k permuted by llama.cpp's converter), and tensor/pipeline-parallel shards checked
 * element by element against the full tensors. */
#include <string.h>

#include "model/gguf.h"
#include "model/model_files.h"
#include "test_util.h"

static float at(const ts_tensor *t, int64_t r, int64_t c) {
  const float *p = t->data;
  return p[r * t->row_stride + c];
}

/* GGUF q/k row of HF row r: within each head, rows (i, i + hd/2) become (2i, 2i+1). */
static int64_t permuted_row(int64_t r, int head_dim) {
  int64_t h = r / head_dim, j = r % head_dim, half = head_dim / 2;
  return h * head_dim + 2 * (j % half) + j / half;
}

static void check_config(const model_config *c) {
  CHECK(c->arch == ARCH_LLAMA);
  CHECK(c->vocab_size == 512);
  CHECK(c->d_model == 64);
  CHECK(c->n_layer == 5);
  CHECK(c->n_head == 8);
  CHECK(c->n_kv_head == 4);
  CHECK(c->head_dim == 8);
  CHECK(c->d_ff == 172);
  CHECK(fabsf(c->rms_eps - 1e-5f) < 1e-9f);
  CHECK(c->rope_theta == 10000.0f);
  CHECK(c->rope_scaling == ROPE_SCALING_NONE);
  CHECK(c->bos_id == 1);
  CHECK(c->n_eos == 1 && c->eos_ids[0] == 2);
}

/* Every element of a shard view equals the full tensor's element at the shifted index. */
static void check_slice(const ts_tensor *full, const ts_tensor *part, int rows, int64_t off) {
  CHECK(part->ndim == full->ndim);
  if (part->ndim == 1) {
    for (int64_t i = 0; i < part->shape[0]; i++)
      CHECK(((const float *)part->data)[i] == ((const float *)full->data)[off * rows + i]);
    return;
  }
  for (int64_t r = 0; r < part->shape[0]; r++)
    for (int64_t c = 0; c < part->shape[1]; c++)
      CHECK(at(part, r, c) == (rows ? at(full, r + off, c) : at(full, r, c + off)));
}

int main(void) {
  char hf[1024], gg[1024];
  snprintf(hf, sizeof hf, "%s/models/stories260K-hf", test_shared_dir());
  snprintf(gg, sizeof gg, "%s/models/stories260K/stories260K.gguf", test_shared_dir());
  ts_err err = {0};
  model_files *mh = NULL, *mg = NULL;
  CHECK_MSG(model_files_open(&mh, hf, &err) == TS_OK, "%s", err.msg);
  CHECK_MSG(model_files_open(&mg, gg, &err) == TS_OK, "%s", err.msg);
  if (!mh || !mg) return test_finish("test_model_files");
  CHECK(model_files_format(mh) == MODEL_FMT_HF);
  CHECK(model_files_format(mg) == MODEL_FMT_GGUF);
  CHECK(model_files_gguf(mh) == NULL && model_files_gguf(mg) != NULL);
  const model_config *ch = model_files_config(mh), *cg = model_files_config(mg);
  check_config(ch);
  check_config(cg);
  CHECK(ch->tie_embeddings == 1 && ch->rope_interleaved == 0 && ch->max_pos == 512);
  CHECK(cg->tie_embeddings == 0 && cg->rope_interleaved == 1 && cg->max_pos == 2048);
  CHECK(model_files_fingerprint(mh) == model_files_fingerprint(mh));
  CHECK(model_files_fingerprint(mh) != model_files_fingerprint(mg));

  model_shard full = model_shard_default(ch, 0, 1, 0, 1);
  CHECK(full.layer_start == 0 && full.layer_end == 5);
  model_weights wh, wg;
  CHECK_MSG(model_files_load_weights(mh, &full, &wh, &err) == TS_OK, "%s", err.msg);
  CHECK_MSG(model_files_load_weights(mg, &full, &wg, &err) == TS_OK, "%s", err.msg);
  CHECK(wh.n_layers == 5 && wg.n_layers == 5);
  CHECK(wh.lm_head.data == wh.tok_embd.data); /* tied: a view, not a copy */
  CHECK(wh.tok_embd.shape[0] == 512 && wh.tok_embd.shape[1] == 64 && wh.tok_embd.row_stride == 64);

  /* HF and GGUF hold the same numbers; GGUF q/k rows are permuted within each head. */
  test_rng rng = {0x5eed1234abcdull};
  CHECK(!memcmp(wh.tok_embd.data, wg.tok_embd.data, 512 * 64 * 4));
  CHECK(!memcmp(wh.tok_embd.data, wg.lm_head.data, 512 * 64 * 4));
  for (int l = 0; l < 5; l++) {
    layer_weights *a = &wh.layers[l], *b = &wg.layers[l];
    CHECK(a->wq.shape[0] == 64 && a->wk.shape[0] == 32 && a->w_down.shape[1] == 172);
    CHECK(!ts_tensor_present(&a->bq) && !ts_tensor_present(&a->q_norm));
    CHECK(!memcmp(a->wv.data, b->wv.data, 32 * 64 * 4));
    CHECK(!memcmp(a->wo.data, b->wo.data, 64 * 64 * 4));
    CHECK(!memcmp(a->w_down.data, b->w_down.data, 64 * 172 * 4));
    CHECK(!memcmp(a->attn_norm.data, b->attn_norm.data, 64 * 4));
    for (int i = 0; i < 200; i++) {
      int64_t r = (int64_t)(test_rng_next(&rng) % 64), c = (int64_t)(test_rng_next(&rng) % 64);
      CHECK(at(&b->wq, permuted_row(r, 8), c) == at(&a->wq, r, c));
      int64_t rk = r % 32;
      CHECK(at(&b->wk, permuted_row(rk, 8), c) == at(&a->wk, rk, c));
    }
  }

  /* Tensor parallel: rows of q/k/v/gate/up and columns of o/down, for every rank of 2 and 4. */
  for (int tp = 2; tp <= 4; tp += 2) {
    for (int rank = 0; rank < tp; rank++) {
      model_shard s = model_shard_default(ch, rank, tp, 0, 1);
      CHECK(model_shard_validate(ch, &s, &err) == TS_OK);
      model_weights ws;
      int rc = model_files_load_weights(mh, &s, &ws, &err);
      CHECK_MSG(rc == TS_OK, "%s", err.msg);
      if (rc) continue;
      int l = (int)(test_rng_next(&rng) % 5);
      layer_weights *f = &wh.layers[l], *p = &ws.layers[l];
      CHECK(p->wq.shape[0] == 64 / tp && p->wk.shape[0] == 32 / tp);
      CHECK(p->wo.shape[1] == 64 / tp && p->wo.row_stride == 64);
      CHECK(p->w_down.shape[1] == 172 / tp && p->w_down.row_stride == 172);
      check_slice(&f->wq, &p->wq, 1, rank * 64 / tp);
      check_slice(&f->wk, &p->wk, 1, rank * 32 / tp);
      check_slice(&f->wv, &p->wv, 1, rank * 32 / tp);
      check_slice(&f->w_gate, &p->w_gate, 1, rank * 172 / tp);
      check_slice(&f->w_up, &p->w_up, 1, rank * 172 / tp);
      check_slice(&f->wo, &p->wo, 0, rank * 64 / tp);
      check_slice(&f->w_down, &p->w_down, 0, rank * 172 / tp);
      CHECK(p->attn_norm.data == f->attn_norm.data && p->ffn_norm.data == f->ffn_norm.data);
      CHECK(ws.tok_embd.data == wh.tok_embd.data && ws.tok_embd.shape[0] == 512);
      model_weights_free(&ws);
    }
  }
  model_shard bad = model_shard_default(ch, 0, 3, 0, 1);
  CHECK(model_shard_validate(ch, &bad, &err) == TS_EINVAL);
  CHECK(strstr(err.msg, "tensor-parallel size 3 must divide") != NULL);

  /* Pipeline: 5 layers over 2 and 3 stages; embedding first, norm and head last (tied: both). */
  for (int pp = 2; pp <= 3; pp++) {
    int covered = 0;
    for (int st = 0; st < pp; st++) {
      model_shard s = model_shard_default(ch, 0, 1, st, pp);
      CHECK(s.layer_start == covered);
      covered = s.layer_end;
      model_weights ws;
      CHECK_MSG(model_files_load_weights(mh, &s, &ws, &err) == TS_OK, "%s", err.msg);
      CHECK(ws.n_layers == s.layer_end - s.layer_start);
      CHECK(ts_tensor_present(&ws.tok_embd) == (st == 0 || st == pp - 1));
      CHECK(ts_tensor_present(&ws.lm_head) == (st == pp - 1));
      CHECK(ts_tensor_present(&ws.out_norm) == (st == pp - 1));
      CHECK(ws.layers[0].wq.data == wh.layers[s.layer_start].wq.data);
      model_weights_free(&ws);
      model_weights wsg; /* GGUF is untied: the last stage has no embedding */
      model_shard sg = model_shard_default(cg, 0, 1, st, pp);
      CHECK_MSG(model_files_load_weights(mg, &sg, &wsg, &err) == TS_OK, "%s", err.msg);
      CHECK(ts_tensor_present(&wsg.tok_embd) == (st == 0));
      CHECK(ts_tensor_present(&wsg.lm_head) == (st == pp - 1));
      model_weights_free(&wsg);
    }
    CHECK(covered == 5);
  }

  ts_tensor t;
  const char *file = NULL;
  CHECK(model_files_find_tensor(mh, "model.norm.weight", &t, &file) == TS_OK);
  CHECK(file && strstr(file, "model.safetensors") && t.ndim == 1 && t.shape[0] == 64);
  CHECK(model_files_find_tensor(mh, "nope", &t, &file) == TS_ENOTFOUND);
  CHECK(model_files_find_tensor(mg, "blk.4.ffn_up.weight", &t, &file) == TS_OK);
  CHECK(t.shape[0] == 172 && t.shape[1] == 64);

  model_weights_free(&wh);
  model_weights_free(&wg);
  model_files_close(mh);
  model_files_close(mg);
  return test_finish("test_model_files");
}
