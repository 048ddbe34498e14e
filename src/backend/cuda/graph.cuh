/* CUDA graphs for decode steps: the ops of a step, from its first op (the embedding) up to the
 * first host synchronisation (the logits download), are captured once per step shape and
 * replayed as one launch afterwards. */
#ifndef TESSERA_CUDA_GRAPH_CUH
#define TESSERA_CUDA_GRAPH_CUH

#include "cuda_common.cuh"

enum {
  CUDA_OP_EMBED = 1,
  CUDA_OP_RMSNORM,
  CUDA_OP_ADD_RMSNORM,
  CUDA_OP_MATMUL,
  CUDA_OP_ROPE,
  CUDA_OP_KV_WRITE,
  CUDA_OP_ATTENTION,
  CUDA_OP_SILU_MUL,
  CUDA_OP_GATHER_ROWS,
  CUDA_OP_MATMUL_HEAD, /* a matmul of more than 65,536 output columns (the lm_head) */
  CUDA_OP_SAMPLE,      /* eager: after the step's graph */
  CUDA_OP_NORM_MATMUL,
  CUDA_OP_NORM_GATE_UP,
  CUDA_OP_MATMUL_ADD,
  CUDA_OP_QK_ROPE_KV,
  CUDA_OP_ALL_REDUCE,  /* a tensor-parallel all-reduce over NCCL, recorded with the step */
  CUDA_OP_COUNT
};
static_assert(CUDA_OP_COUNT <= CUDA_PROF_TAGS, "cuda_ctx's profile arrays need a slot per tag");

/* TESSERA_CUDA_STATS=2: charges the time since the previous op to that op (tag 0: none), in
 * decode steps. */
void cuda_prof_mark(cuda_ctx *c, int tag);

/* step_begin: marks a step graph-eligible (or not) once its plan is staged. */
void cuda_graph_step(cuda_ctx *c, int eligible, const kv_cache *kv);
/* At the top of every op: returns 1 when the op must not launch (a replay will run it). The
 * pointers and sizes identify the call; a replay checks that the sequence matches the capture. */
int cuda_graph_op(cuda_ctx *c, int tag, const void *p0, const void *p1, const void *p2,
                  int64_t n0, int64_t n1);
/* Before any host synchronisation or transfer: ends a capture (instantiating and launching the
 * graph) or launches the replay. Returns 0 or records the failure. */
int cuda_graph_flush(cuda_ctx *c);
/* Forgets every graph (their buffers moved); cuda_scratch_reserve calls it on growth. */
void cuda_graph_clear(cuda_ctx *c);

#endif
