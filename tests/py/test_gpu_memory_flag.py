"""--gpu-memory-utilization on serve and worker: values outside (0, 1] are refused with one line
before anything loads; on the CPU the flag leaves the KV cache as --kv-cache-memory and the default
size it (the engine's block count is the same with and without it)."""
import random
import re
import subprocess


def _bad_values(rng):
    return ["0", "-0.5", f"{rng.uniform(1.0001, 50):.4f}", "abc", "0.5x", "nan", ""]


def test_serve_refuses_out_of_range(tessera, shared):
    rng = random.Random()
    model = str(shared / "models" / "stories260K-hf")
    for v in _bad_values(rng):
        r = subprocess.run([tessera, "serve", model, "--gpu-memory-utilization", v, "--port", "0"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (v, r.stderr)
        assert "--gpu-memory-utilization expects a number in (0, 1]" in r.stderr, (v, r.stderr)


def test_worker_refuses_out_of_range(tessera):
    rng = random.Random()
    for v in _bad_values(rng):
        r = subprocess.run([tessera, "worker", "--gpu-memory-utilization", v],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0, (v, r.stderr)
        assert "--gpu-memory-utilization" in r.stderr, (v, r.stderr)


def _blocks(tessera, model, extra):
    p = subprocess.Popen([tessera, "serve", model, "--port", "0", "--host", "127.0.0.1",
                          "--max-model-len", "256", *extra],
                         stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            m = re.search(r"engine: (\d+) KV blocks", line)
            if m:
                return int(m.group(1))
            assert "tessera serve:" not in line or "serving" in line, line
    finally:
        p.terminate()
        p.wait(timeout=30)
    raise AssertionError("no engine line")


def test_cpu_keeps_its_kv_sizing(tessera, shared):
    model = str(shared / "models" / "stories260K-hf")
    util = f"{random.uniform(0.05, 1.0):.3f}"
    assert _blocks(tessera, model, ["--gpu-memory-utilization", util]) == _blocks(tessera, model, [])
    kv = random.randint(1, 64)
    assert (_blocks(tessera, model, ["--kv-cache-memory", f"{kv}M", "--gpu-memory-utilization", util])
            == _blocks(tessera, model, ["--kv-cache-memory", f"{kv}M"]))
