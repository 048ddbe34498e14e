/* The weights one rank holds, as views into the mapped model files (never copies). Local sizes:
 * n_head_l = n_head / tp_size, n_kv_l = n_kv_head / tp_size, d_ff_l = d_ff / tp_size. */
#ifndef TESSERA_MODEL_WEIGHTS_H
#define TESSERA_MODEL_WEIGHTS_H

#include "model/config.h"
#include "util/tensor.h"

typedef struct {
  ts_tensor attn_norm; /* [d_model] */
  ts_tensor wq;        /* [n_head_l*head_dim][d_model] */
  ts_tensor wk;        /* [n_kv_l*head_dim][d_model] */
  ts_tensor wv;        /* [n_kv_l*head_dim][d_model] */
  ts_tensor bq;        /* [n_head_l*head_dim] (Qwen2 only) */
  ts_tensor bk;        /* [n_kv_l*head_dim]   (Qwen2 only) */
  ts_tensor bv;        /* [n_kv_l*head_dim]   (Qwen2 only) */
  ts_tensor q_norm;    /* [head_dim] (Qwen3 only) */
  ts_tensor k_norm;    /* [head_dim] (Qwen3 only) */
  ts_tensor wo;        /* [d_model][n_head_l*head_dim], row_stride n_head*head_dim */
  ts_tensor ffn_norm;  /* [d_model] */
  ts_tensor w_gate;    /* [d_ff_l][d_model] */
  ts_tensor w_up;      /* [d_ff_l][d_model] */
  ts_tensor w_down;    /* [d_model][d_ff_l], row_stride d_ff */
} layer_weights;

typedef struct {
  ts_tensor tok_embd;  /* [vocab][d_model]; present on the first stage (and the last when tied) */
  ts_tensor out_norm;  /* [d_model]; last stage */
  ts_tensor lm_head;   /* [vocab][d_model]; last stage; the tok_embd view when tied */
  int n_layers;        /* shard.layer_end - shard.layer_start */
  layer_weights *layers; /* [n_layers], index 0 is global layer shard.layer_start */
} model_weights;

#endif
