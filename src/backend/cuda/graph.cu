/* CUDA graphs for decode steps.
 *
 * A decode step launches hundreds of small kernels whose host launch cost exceeds their run time
 * at batch 1. Every value that changes between two steps of the same shape lives in device memory
 * at a fixed address (the staged plan: ids, positions, slots, block table, context lengths), and
 * every launch parameter is fixed by the step's key: tokens, sequences, block-table columns,
 * logits rows, the context bucket (which fixes the attention split), the plan buffer and the KV
 * cache, and the first op's weight and output. So the kernels of one shape can be recorded once
 * and replayed.
 *
 * States per step: OFF (launch eagerly), PENDING (eligible; the first op decides), CAPTURE
 * (recording; nothing runs until the flush), REPLAY (ops are skipped and hashed; the flush
 * launches the graph if the hash matches the capture's). A shape is captured the second time it
 * is seen, so the first, eager run has already grown every scratch buffer to its size; growth
 * afterwards frees buffers a graph may hold, so it clears the cache. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "graph.cuh"

static uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  return h * 0xBF58476D1CE4E5B9ull;
}

static int key_equal(const cuda_graph_key *a, const cuda_graph_key *b) {
  return memcmp(a, b, sizeof *a) == 0;
}

void cuda_graph_clear(cuda_ctx *c) {
  for (int i = 0; i < c->n_graphs; i++)
    if (c->graphs[i].exec) cudaGraphExecDestroy(c->graphs[i].exec);
  c->n_graphs = 0;
  c->gmode = CUDA_GRAPH_OFF;
}

void cuda_graph_step(cuda_ctx *c, int eligible, const kv_cache *kv) {
  if (c->gmode == CUDA_GRAPH_CAPTURE) cuda_graph_flush(c); /* a step that never synchronised */
  c->gmode = CUDA_GRAPH_OFF;
  if (!eligible || !c->graphs_enabled || !kv) return;
  memset(&c->gkey, 0, sizeof c->gkey); /* padding too: keys are compared with memcmp */
  c->gkey.n_tokens = c->n_tokens;
  c->gkey.n_seqs = c->n_seqs;
  c->gkey.max_blocks = c->max_blocks;
  c->gkey.n_logits = c->n_logits;
  c->gkey.max_ctx = c->max_ctx;
  c->gkey.plan = c->plan_dev;
  c->gkey.kv_k = kv->k;
  c->gkey.kv_k0 = kv->n_layers > 0 ? kv->k[0] : NULL;
  c->gmode = CUDA_GRAPH_PENDING;
}

static int graph_find(cuda_ctx *c) {
  for (int i = 0; i < c->n_graphs; i++)
    if (key_equal(&c->graphs[i].key, &c->gkey)) return i;
  return -1;
}

void cuda_prof_mark(cuda_ctx *c, int tag) {
  if (c->stats != 2) return;
  cudaStreamSynchronize(c->stream);
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  double now = (double)ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  /* Decode steps only (one token per sequence): prefill would swamp their figures. */
  if (c->prof_tag > 0 && c->prof_tag < CUDA_OP_COUNT && c->n_tokens == c->n_seqs) {
    c->prof_ms[c->prof_tag] += now - c->prof_t;
    c->prof_n[c->prof_tag]++;
  }
  c->prof_tag = tag;
  c->prof_t = now;
}

int cuda_graph_op(cuda_ctx *c, int tag, const void *p0, const void *p1, const void *p2,
                  int64_t n0, int64_t n1) {
  cuda_prof_mark(c, tag);
  if (c->gmode == CUDA_GRAPH_OFF) return 0;
  if (c->gmode == CUDA_GRAPH_PENDING) {
    c->gmode = CUDA_GRAPH_OFF;
    if (tag != CUDA_OP_EMBED || c->err_code) return 0;
    c->gkey.first_w = p0;
    c->gkey.first_out = p1;
    int i = graph_find(c);
    if (i < 0) {
      /* First sight: run eagerly, remember the shape. */
      if (c->n_graphs < CUDA_MAX_GRAPHS) {
        cuda_graph_entry *e = &c->graphs[c->n_graphs++];
        memset(e, 0, sizeof *e);
        e->key = c->gkey;
      }
      return 0;
    }
    c->gcur = i;
    c->ghash = 0x12345678u;
    c->gops = 0;
    if (c->graphs[i].exec) {
      c->gmode = CUDA_GRAPH_REPLAY;
    } else {
      if (CUDA_CHECK(c, cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeRelaxed)))
        return 0;
      c->gmode = CUDA_GRAPH_CAPTURE;
    }
  }
  uint64_t h = mix(c->ghash, (uint64_t)tag);
  h = mix(h, (uint64_t)(uintptr_t)p0);
  h = mix(h, (uint64_t)(uintptr_t)p1);
  h = mix(h, (uint64_t)(uintptr_t)p2);
  h = mix(h, (uint64_t)n0);
  c->ghash = mix(h, (uint64_t)n1);
  c->gops++;
  return c->gmode == CUDA_GRAPH_REPLAY;
}

int cuda_graph_flush(cuda_ctx *c) {
  int mode = c->gmode;
  c->gmode = CUDA_GRAPH_OFF;
  if (mode != CUDA_GRAPH_CAPTURE && mode != CUDA_GRAPH_REPLAY) return 0;
  cuda_graph_entry *e = &c->graphs[c->gcur];
  if (mode == CUDA_GRAPH_CAPTURE) {
    cudaGraph_t g = NULL;
    cudaError_t ce = cudaStreamEndCapture(c->stream, &g);
    if (CUDA_CHECK(c, ce)) return -1;
    if (c->err_code) { /* an op failed while recording: its work is lost with the graph */
      cudaGraphDestroy(g);
      return -1;
    }
    cudaGraphExec_t ex = NULL;
    ce = cudaGraphInstantiate(&ex, g, 0);
    cudaGraphDestroy(g);
    if (CUDA_CHECK(c, ce)) return -1;
    e->exec = ex;
    c->n_captures++;
    e->hash = c->ghash;
    e->n_ops = c->gops;
  } else if (e->hash != c->ghash || e->n_ops != c->gops) {
    cuda_fail(c, TS_EINTERNAL,
              "CUDA graph replay: the step issued %d ops unlike the %d captured for its shape "
              "(run with TESSERA_CUDA_GRAPHS=0 to launch eagerly)",
              c->gops, e->n_ops);
    return -1;
  } else {
    c->n_replays++;
  }
  return CUDA_CHECK(c, cudaGraphLaunch(e->exec, c->stream));
}
