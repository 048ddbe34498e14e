#!/usr/bin/env bash
# tessera vs llama.cpp on one CUDA GPU, side by side on the same BF16 weights: a random checkpoint
# at a published shape (tools/gen_checkpoint.py PRESET --dtype bf16 --gguf), its Hugging Face
# directory for tessera and its GGUF for llama.cpp. Figures, each with tessera / llama.cpp:
#   - prefill of PP tokens and decode of TG tokens after a PP-token prompt at batch 1 (tessera
#     bench; llama-bench -fa 1, the decode with -d PP);
#   - total decode tokens/s at 1, 8, 32, 64, 128, 256 sequences of PP prompt tokens each
#     (tessera bench --batch B; llama-batched-bench -fa 1 -npl ...);
#   - the device copy bandwidth (read + write) and the bf16 matmul rate, measured in the same run
#     through torch, and the rooflines they give (weights + K/V bytes over the bandwidth for
#     decode, FLOPs over the matmul rate for prefill).
# llama.cpp is not part of this repository: build it with CUDA by hand, elsewhere, and pass the
# directory holding llama-bench and llama-batched-bench.
# Usage (on the GPU machine, from the checkout):
#   bash bench/cuda_vs_llamacpp.sh LLAMA_BIN_DIR [TESSERA_BINARY] [WORK_DIR]
# Environment: PRESET (qwen3-0.6b), PP (512), TG (128), TG_BATCH (decode steps per batch run, 32),
# BATCHES ("1 8 32 64 128 256"), REPS (llama-bench repetitions, 3), TOKENIZERS (for
# gen_checkpoint.py).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
LB=$1
T=${2:-build/tessera}
W=${3:-/tmp/tessera_vs_llamacpp}
PRESET=${PRESET:-qwen3-0.6b}
PP=${PP:-512}
TG=${TG:-128}
TG_BATCH=${TG_BATCH:-32}
BATCHES=${BATCHES:-1 8 32 64 128 256}
REPS=${REPS:-3}
for b in llama-bench llama-batched-bench; do
  [ -x "$LB/$b" ] || { echo "no $LB/$b (a llama.cpp CUDA build's bin/ directory)"; exit 2; }
done
[ -x "$T" ] || { echo "no tessera binary at $T"; exit 2; }
mkdir -p "$W"
M=$W/$PRESET
G=$W/$PRESET-bf16.gguf
if [ ! -f "$G" ] || [ ! -f "$M/config.json" ]; then
  python3 tools/gen_checkpoint.py "$PRESET" "$M" --dtype bf16 --gguf "$G" --jobs 8 \
    ${TOKENIZERS:+--tokenizers "$TOKENIZERS"} || exit 1
fi
R=$W/results
mkdir -p "$R"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
  | tee "$R/env.txt"

echo "== ceilings (torch) =="
python3 - <<'EOF' >"$R/ceil.json" || exit 1
import json, torch
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
for _ in range(3): y.copy_(x)
s.record()
for _ in range(20): y.copy_(x)
e.record(); torch.cuda.synchronize()
bw = 2 * 20 * x.numel() / (s.elapsed_time(e) / 1e3)
del x, y
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
s.record()
for _ in range(10): a @ b
e.record(); torch.cuda.synchronize()
mm = 2 * n ** 3 * 10 / (s.elapsed_time(e) / 1e3)
print(json.dumps({"copy_Bps": bw, "bf16_flops": mm}))
EOF
cat "$R/ceil.json"

echo "== tessera =="
: >"$R/tessera.jsonl"
"$T" bench "$M" --device cuda --prompt-tokens "$PP" --gen-tokens "$TG" --batch 1 --json \
  | tee -a "$R/tessera.jsonl" || exit 1
for B in $BATCHES; do
  "$T" bench "$M" --device cuda --prompt-tokens "$PP" --gen-tokens "$TG_BATCH" --batch "$B" \
    --json | tee -a "$R/tessera.jsonl" || exit 1
done

echo "== llama.cpp =="
# Prefill from an empty cache; decode after a PP-token prompt (-d), as tessera bench decodes.
"$LB/llama-bench" -m "$G" -ngl 99 -fa 1 -p "$PP" -n 0 -r "$REPS" -o json \
  >"$R/llama_bench_pp.json" || exit 1
"$LB/llama-bench" -m "$G" -ngl 99 -fa 1 -p 0 -n "$TG" -d "$PP" -r "$REPS" -o json \
  >"$R/llama_bench_tg.json" || exit 1
python3 -c 'import json,sys; print(json.dumps(sum((json.load(open(f)) for f in sys.argv[1:]), [])))' \
  "$R/llama_bench_pp.json" "$R/llama_bench_tg.json" >"$R/llama_bench.json" || exit 1
cat "$R/llama_bench.json"
NPL=$(echo $BATCHES | tr ' ' ',')
MAXB=$(echo $BATCHES | tr ' ' '\n' | sort -n | tail -1)
"$LB/llama-batched-bench" -m "$G" -ngl 99 -fa 1 -c $(((PP + TG_BATCH) * MAXB + 256)) -b 2048 \
  -ub 512 -npp "$PP" -ntg "$TG_BATCH" -npl "$NPL" --output-format jsonl 2>/dev/null \
  | grep '^{' >"$R/llama_batched.jsonl" || exit 1
cat "$R/llama_batched.jsonl"

python3 - "$R" "$M/config.json" "$PP" "$TG_BATCH" <<'EOF'
import json, sys
R, cfg_path, PP, TGB = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = json.load(open(cfg_path))
ceil = json.load(open(f"{R}/ceil.json"))
bw, mm = ceil["copy_Bps"], ceil["bf16_flops"]
d, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
hd = cfg.get("head_dim") or d // nh
ff = cfg["intermediate_size"]
layer = d * hd * (nh + 2 * nkv) + nh * hd * d + 3 * d * ff  # 2-D weights of one layer
body, head = L * layer, V * d
wbytes = 2 * (body + head)                                    # bf16, lm_head read once a step
kv_tok = 2 * L * nkv * hd * 2                                 # bf16 K and V of one position
ts = [json.loads(l) for l in open(f"{R}/tessera.jsonl") if l.startswith("{")]
lb = json.load(open(f"{R}/llama_bench.json"))
lbb = [json.loads(l) for l in open(f"{R}/llama_batched.jsonl")]
def lb_rate(n_prompt, n_gen):
    for r in lb:
        if r["n_prompt"] == n_prompt and r["n_gen"] == n_gen:
            return r["avg_ts"]
    return float("nan")
def ratio(a, b):
    return f"{a / b:.2f}x" if b == b and b > 0 else "n/a"
print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write); bf16 matmul {mm / 1e12:.0f} TFLOP/s")
print(f"weights {wbytes / 1e9:.3f} GB bf16 ({(body + head) / 1e6:.0f} M params in 2-D weights)")
rows = []
t1 = ts[0]
# prefill: every 2-D weight per token but the lm_head (last token only), causal attention
fl_tok = 2 * body + 2 * head / PP + 4 * L * nh * hd * (PP + 1) / 2
rows.append((f"prefill {PP}, batch 1 (tok/s)", t1["prefill_tok_s"], lb_rate(PP, 0),
             mm / fl_tok))
ctx1 = PP + t1["gen_tokens"] / 2
rows.append((f"decode {t1['gen_tokens']}, batch 1 (tok/s)", t1["decode_tok_s"],
             lb_rate(0, t1["gen_tokens"]), bw / (wbytes + kv_tok * ctx1)))
lbb_by = {r["pl"]: r for r in lbb}
for t in ts[1:]:
    B = t["batch"]
    ctx = PP + TGB / 2
    step = max((wbytes + B * kv_tok * ctx) / bw, 2 * (body + head) * B / mm)
    rows.append((f"total decode, {B} seqs (tok/s)", t["decode_tok_s"],
                 lbb_by.get(B, {}).get("speed_tg", float("nan")), B / step))
    if B == max(x["batch"] for x in ts[1:]):
        rows.append((f"prefill {PP} x {B} seqs (tok/s)", t["prefill_tok_s"],
                     lbb_by.get(B, {}).get("speed_pp", float("nan")), mm / fl_tok))
print(f"| figure | tessera | llama.cpp | tessera / llama.cpp | roofline | tessera / roofline |")
print(f"| --- | ---: | ---: | ---: | ---: | ---: |")
for name, a, b, roof in rows:
    print(f"| {name} | {a:,.0f} | {b:,.0f} | {ratio(a, b)} | {roof:,.0f} | {ratio(a, roof)} |")
print("rooflines: decode = (weights + K/V at mid-decode context) / copy bandwidth, or "
      "2 x params x B / matmul rate if larger; prefill = FLOPs per token / matmul rate")
EOF
