"""Black-box tests of bench/serve_bench.py against tessera serve on the tiny stories model: a sweep
of concurrency levels over two targets with alternating rounds returns every request at exactly
its asked length, and a server that cannot give the asked lengths makes the run fail."""
import json
import pathlib
import random
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "serve_bench.py"


def workload_out_tokens(seed, n_prompts, input_len, output_len):
    """Output tokens the script asks for, drawn by its own workload generator."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        import serve_bench
    finally:
        sys.path.pop(0)
    import argparse
    a = argparse.Namespace(seed=seed, num_prompts=n_prompts, input_len=input_len,
                           output_len=output_len)
    return sum(n for _, n in serve_bench.make_workload(a))


def run_bench(args, tmp_path, timeout=240):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(BENCH), *args, "--json-out", str(out)],
                       capture_output=True, text=True, timeout=timeout)
    data = json.loads(out.read_text()) if out.exists() else None
    return p, data


def test_sweep_two_targets_alternating(tessera, shared, tmp_path):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    levels = [1, rng.randint(2, 4)]
    prompts = [rng.randint(2, 4), rng.randint(4, 8)]
    lo = rng.randint(4, 12)
    out_spec = f"{lo}:{lo + rng.randint(0, 16)}"
    in_spec = f"{rng.randint(4, 16)}:{rng.randint(16, 40)}"
    model = str(shared / "models" / "stories260K-hf")
    p, data = run_bench(["--tessera", tessera, model, "--tessera", tessera, model,
                         "--max-concurrency", ",".join(map(str, levels)),
                         "--num-prompts", ",".join(map(str, prompts)), "--rounds", "2",
                         "--input-len", in_spec, "--output-len", out_spec,
                         "--seed", str(seed)], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    runs = data["runs"]
    assert len(runs) == 2 * len(levels) * 2
    for c, n in zip(levels, prompts):
        want = workload_out_tokens(seed, n, in_spec, out_spec)
        at = [r for r in runs if r["concurrency"] == c]
        # Round 1 runs the targets in the given order, round 2 in reverse.
        assert [r["target"] for r in at] == ["tessera", "tessera#1", "tessera#1", "tessera"]
        for r in at:
            res = r["result"]
            assert res["completed"] == n and res["failed"] == 0
            assert res["length_mismatch"] == 0
            assert res["output_tokens"] == want
            assert res["input_tokens"] > 0
            assert len(res["loadavg"]) == 2
    # The summary names every level and gives each target's ratio to the first.
    lines = [ln.split() for ln in p.stdout.splitlines() if ln.split()[:1] in (["1"], [str(levels[1])])]
    assert len(lines) == 4 and all(ln[-2].endswith("x") and ln[-1].endswith("x") for ln in lines)


def test_short_outputs_fail_the_run(tessera, shared, tmp_path):
    # A context of 48 tokens cannot hold 24-32 prompt tokens plus 32-40 generated ones: every
    # request is refused or cut short, and the run must say so rather than report a figure.
    rng = random.Random()
    p, data = run_bench(["--tessera", tessera, str(shared / "models" / "stories260K-hf"),
                         "--tessera-args", "--max-model-len 48", "--max-concurrency", "2",
                         "--num-prompts", str(rng.randint(2, 4)), "--input-len", "24:32",
                         "--output-len", "32:40", "--seed", str(rng.randrange(1 << 30))],
                        tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    res = data["runs"][0]["result"]
    assert res["failed"] + res["length_mismatch"] == res["completed"] + res["failed"] > 0
