"""BF16 weights through the server (the AMX-BF16 kernel where the CPU has it, else the float32
kernels): greedy texts of many concurrent requests, batched together in varying step sizes,
equal the texts of the same requests sent one at a time."""
import http.client
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from dist_helpers import RNG, WORDS, Serve

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bf16_model(shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "tiny-qwen3-bf16"
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_checkpoint.py"), "tiny-qwen3",
                    str(out), "--dtype", "bf16", "--seed", str(RNG.randint(1, 1 << 30)),
                    "--tokenizers", str(shared / "tokenizers")], check=True, timeout=120)
    return out


def complete(port, prompt):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    payload = json.loads(r.read())
    conn.close()
    assert r.status == 200, payload
    return payload["choices"][0]["text"]


def test_bf16_concurrent_equals_sequential(tessera, bf16_model):
    s = Serve(tessera, bf16_model, "--max-num-seqs", "48", env={"TESSERA_CPU_AMX": "1"})
    try:
        prompts = [" ".join(RNG.choice(WORDS) for _ in range(RNG.randint(1, 40)))
                   for _ in range(48)]
        seq = [complete(s.port, p) for p in prompts]
        with ThreadPoolExecutor(48) as pool:
            par = list(pool.map(lambda p: complete(s.port, p), prompts))
        assert par == seq
        print("AMX in use" if "AMX-BF16" in s.text() else "no AMX on this CPU: float32 kernels")
    finally:
        s.stop()
