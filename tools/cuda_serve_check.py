#!/usr/bin/env python3
"""Checks `tessera serve --device cuda` (device sampling in the engine) against `tessera generate`.

  - greedy: 8 concurrent requests of one prompt return the text that `generate` prints (the
    engine batches them, and each row is sampled on the device);
  - seeded sampling (temperature, top_p, top_k, penalties): the same request alone and inside a
    batch of other requests returns the same text (draws depend only on the seed and the step);
  - logprobs / logit_bias requests (the host path) still answer.

Only the standard library, so it runs on a bare GPU machine.
  cuda_serve_check.py --tessera BIN --model DIR [--port 18731]
"""
import argparse
import concurrent.futures as cf
import json
import subprocess
import sys
import time
import urllib.request


def post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tessera", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=18731)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    prompt, n_tok = "Once upon a time", 48
    ref = subprocess.run([a.tessera, "generate", a.model, "--device", a.device, "--prompt", prompt,
                          "--max-tokens", str(n_tok)],
                         capture_output=True, text=True, timeout=120)
    if ref.returncode != 0:
        print("generate failed:", ref.stderr[-500:])
        return 1
    srv = subprocess.Popen([a.tessera, "serve", a.model, "--device", a.device, "--host",
                            "127.0.0.1", "--port", str(a.port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    fails = 0
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{a.port}/health", timeout=2)
                break
            except Exception:
                if srv.poll() is not None:
                    print("serve exited:", srv.stderr.read()[-800:])
                    return 1
                time.sleep(0.2)
        greedy = {"prompt": prompt, "max_tokens": n_tok, "temperature": 0}
        with cf.ThreadPoolExecutor(8) as ex:
            outs = list(ex.map(lambda _: post(a.port, greedy), range(8)))
        texts = [o["choices"][0]["text"] for o in outs]
        ok = all(t == ref.stdout for t in texts)
        print(f"greedy x8 concurrent vs generate: {'EQUAL' if ok else 'DIFFERS'}")
        if not ok:
            fails += 1
            print("  generate:", repr(ref.stdout[:120]))
            print("  serve:   ", [repr(t[:60]) for t in texts[:3]])
        seeded = {"prompt": "The little dog", "max_tokens": 40, "temperature": 0.9, "top_p": 0.9,
                  "top_k": 40, "presence_penalty": 0.3, "frequency_penalty": 0.2, "seed": 1234}
        alone = post(a.port, seeded)["choices"][0]["text"]
        others = [{"prompt": f"Story {i}:", "max_tokens": 30 + i, "temperature": 1.0, "seed": i}
                  for i in range(7)]
        with cf.ThreadPoolExecutor(8) as ex:
            futs = [ex.submit(post, a.port, b) for b in others[:3]]
            mine = ex.submit(post, a.port, seeded)
            futs += [ex.submit(post, a.port, b) for b in others[3:]]
            batched = mine.result()["choices"][0]["text"]
            for f in futs:
                f.result()
        same = alone == batched
        print(f"seeded sampling alone vs in a batch: {'EQUAL' if same else 'DIFFERS'}")
        if not same:
            fails += 1
            print("  alone:  ", repr(alone[:80]))
            print("  batched:", repr(batched[:80]))
        distinct = len({post(a.port, dict(seeded, seed=s))["choices"][0]["text"]
                        for s in range(4)})
        print(f"seeded sampling, 4 seeds: {distinct} distinct texts")
        if distinct < 2:
            fails += 1
        lp = post(a.port, {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2})
        lp_ok = lp["choices"][0]["text"] == ref.stdout[:len(lp["choices"][0]["text"])] and \
            lp["choices"][0].get("logprobs") is not None
        print(f"logprobs request (host path): {'OK' if lp_ok else 'BAD'}")
        if not lp_ok:
            fails += 1
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=20)
        except subprocess.TimeoutExpired:
            srv.kill()
    print(f"serve check: {fails} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
