"""The Ray launcher (python/tessera_ray) on a real two-node Ray cluster: each node in its own
network namespace with its own address (tests/py/netns.py). Placement, unit assignment, the
visibility variable and the secret as workers see them, worker/actor/launcher deaths, and every
failure message: missing key, too few units, busy units, address mismatch, Ray absent, no
cluster. The workers here are small Python programs that record what they were given. End to
end, `tessera serve --distributed-executor-backend ray` with T=2, P=2 and T=2 x P=2 across both
nodes gives the same greedy texts as uni on stories260K and on tiny random Qwen3 and Llama
checkpoints."""
import json
import os
import pathlib
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "python"))
import netns  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYDIR = ROOT / "python"
PACK_UNITS = 3  # units of the pack-test key on node 1
NODE_UNITS = 2  # units of "tessera_cpu" on each node: T=2 x P=2 fits across the two nodes
NODE_GPUS = 2   # GPUs node 1 declares (it has none: the launcher's "GPU" path without devices)

WORKER = r"""
import json, os, sys, time
out, mode, var, secret_env = sys.argv[1:5]
flags = sys.argv[5:]
d = dict(zip(flags[::2], flags[1::2]))
rec = {"flags": flags, "pid": os.getpid(), "ppid": os.getppid(), "dev": os.environ.get(var),
       "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "secret": os.environ.get(secret_env),
       "cmdline": open("/proc/self/cmdline", "rb").read().decode("utf-8", "replace")}
tmp = os.path.join(out, "rank%s.tmp" % d["--rank"])
with open(tmp, "w") as f:
    json.dump(rec, f)
os.rename(tmp, os.path.join(out, "rank%s.json" % d["--rank"]))
if mode.startswith("exit"):
    sys.exit(int(mode.split(":")[1]))
while True:
    time.sleep(60)
"""


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it has exited all the same.
    try:
        return open("/proc/%d/stat" % pid).read().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = netns.available()
    if why:
        pytest.skip(why)
    # A short temp dir: Ray's unix sockets live under it and their paths must stay < 108 bytes.
    c = netns.RayCluster([{"tessera_cpu": NODE_UNITS, "ts_head": 1},
                          {"tessera_cpu": NODE_UNITS, "ts_pack": PACK_UNITS, "GPU": NODE_GPUS}],
                         tempfile.mkdtemp(prefix="tsray", dir="/tmp"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


class Launch:
    """One launcher run inside the head's namespace; stdout parsed, stderr collected."""

    def __init__(self, cluster, tmp, n, worker_mode="sleep", strategy="PACK", key="tessera_cpu",
                 timeout=30, address=None, python=None, extra_env=None, driver=None):
        self.out = tmp / ("w%s" % secrets.token_hex(4))
        self.out.mkdir()
        self.var = "TS_DEV_%s" % secrets.token_hex(3).upper()
        self.secret_env = "TS_SECRET_%s" % secrets.token_hex(3).upper()
        self.secret = secrets.token_hex(16)
        env = cluster.env()
        env["PYTHONPATH"] = str(PYDIR)
        env[self.secret_env] = self.secret
        env.pop("TESSERA_HOST_IP", None)
        env.update(extra_env or {})
        py = python or [sys.executable]
        argv = py + ["-m", "tessera_ray.launch", "--address", address or cluster.address,
                     "--num-workers", str(n), "--device-key", key, "--device-env", self.var,
                     "--strategy", strategy, "--placement-timeout", str(timeout),
                     "--driver", driver or "%s:%d" % (cluster.ips[0], 40000),
                     "--secret-env", self.secret_env, "--",
                     sys.executable, "-c", WORKER, str(self.out), worker_mode, self.var,
                     self.secret_env]
        self.errf = open(tmp / ("err-%s" % secrets.token_hex(4)), "w+")
        self.p = subprocess.Popen(cluster.exec_argv(0, argv), env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.errf, text=True)
        self.lines = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.strip() == "READY":
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout=90):
        assert self.ready.wait(timeout), "no READY: " + self.stderr()
        assert self.lines and self.lines[-1] == "READY", (self.lines, self.stderr())
        placed = {}
        for line in self.lines[:-1]:
            m = re.fullmatch(r"PLACED (\d+) (\S+) (\S+)", line)
            assert m, "unexpected stdout line %r" % line
            placed[int(m.group(1))] = (m.group(2), m.group(3))
        return placed

    def records(self, n, timeout=30):
        wait_until(lambda: len(list(self.out.glob("rank*.json"))) == n, timeout,
                   "worker records")
        return {r: json.loads((self.out / ("rank%d.json" % r)).read_text()) for r in range(n)}

    def stderr(self):
        self.errf.flush()
        self.errf.seek(0)
        return self.errf.read()

    def close_stdin(self):
        self.p.stdin.close()

    def finish(self, timeout=30):
        """Exit code; the launcher must end on its own within the timeout."""
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError("launcher did not exit: " + self.stderr())

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def run_failing(cluster, tmp, within=30, **kw):
    """The launcher must fail on its own within `within` seconds, with nothing on stdout."""
    la = Launch(cluster, tmp, **kw)
    code = la.finish(within)  # stdin stays open, as under a live driver
    assert code != 0, la.stderr()
    assert la.lines == [], la.lines
    return la.stderr()


def ns_of(cluster, pid):
    r = netns.sh("ip", "netns", "identify", str(pid), check=False)
    return r.stdout.strip()


def test_assign_units_random():
    """Ray's ids when they tell a node's bundles apart, else 0..k-1 per node in rank order."""
    from tessera_ray.launch import assign_units
    rng = random.Random(secrets.randbits(32))
    for _ in range(200):
        n = rng.randint(1, 12)
        nodes = ["node%d" % rng.randrange(4) for _ in range(n)]
        distinct = rng.random() < 0.5
        pool = {nd: rng.sample(range(16), 16) for nd in set(nodes)}
        infos = []
        for r, nd in enumerate(nodes):
            ids = [str(pool[nd].pop())] if distinct else ["0"]
            infos.append((nd, "ip-" + nd, ids, 1000 + r))
        units = assign_units(infos)
        for nd in set(nodes):
            ranks = [r for r in range(n) if nodes[r] == nd]
            got = [units[r] for r in ranks]
            if distinct or len(ranks) == 1:
                assert got == [infos[r][2][0] for r in ranks]
            else:
                assert got == [str(i) for i in range(len(ranks))]


def test_spread_places_workers_on_both_nodes(cluster, tmp_path):
    la = Launch(cluster, tmp_path, 2, strategy="SPREAD")
    try:
        placed = la.wait_ready()
        assert sorted(placed) == [0, 1]
        assert sorted(ip for ip, _ in placed.values()) == sorted(cluster.ips)
        recs = la.records(2)
        for r, rec in recs.items():
            ip, unit = placed[r]
            assert rec["flags"] == ["--rank", str(r), "--unit", unit, "--node-ip", ip]
            assert unit == "0"  # SPREAD: one worker per node, so each takes its node's first
            assert rec["dev"] == unit
            assert rec["secret"] == la.secret
            assert la.secret not in rec["cmdline"]
            # The worker really runs on the node it was reported on.
            assert ns_of(cluster, rec["pid"]) == cluster.ns[cluster.ips.index(ip)]
        assert la.secret not in open("/proc/%d/cmdline" % la.p.pid, "rb").read().decode()
        la.close_stdin()
        assert la.finish() == 0, la.stderr()
        for rec in recs.values():
            wait_until(lambda: gone(rec["pid"]), 20, "worker %d to stop" % rec["pid"])
    finally:
        la.kill()


def test_pack_numbers_units_on_one_node(cluster, tmp_path):
    n = PACK_UNITS
    la = Launch(cluster, tmp_path, n, key="ts_pack")
    try:
        placed = la.wait_ready()
        assert {ip for ip, _ in placed.values()} == {cluster.ips[1]}
        assert sorted(u for _, u in placed.values()) == [str(i) for i in range(n)]
        recs = la.records(n)
        assert all(recs[r]["dev"] == placed[r][1] for r in range(n))
    finally:
        la.close_stdin()
        la.finish()
        la.kill()


def test_gpu_key_takes_rays_gpu_ids(cluster, tmp_path):
    """Key "GPU" (what --device cuda uses): bundles and actors ask Ray for GPUs the way Ray
    accepts them, each worker's unit is the GPU id Ray assigned (distinct on one node), and the
    visibility variable the worker sees is that id."""
    la = Launch(cluster, tmp_path, NODE_GPUS, key="GPU")
    try:
        placed = la.wait_ready()
        assert {ip for ip, _ in placed.values()} == {cluster.ips[1]}
        assert sorted(u for _, u in placed.values()) == [str(i) for i in range(NODE_GPUS)]
        recs = la.records(NODE_GPUS)
        for r, rec in recs.items():
            assert rec["dev"] == placed[r][1]
            assert rec["cuda"] == placed[r][1]  # Ray's own setting agrees with the unit
    finally:
        la.close_stdin()
        la.kill()


def test_worker_exit_is_reported(cluster, tmp_path):
    code = 3 + secrets.randbelow(100)
    la = Launch(cluster, tmp_path, 2, worker_mode="exit:%d" % code, strategy="SPREAD")
    try:
        placed = la.wait_ready()
        rc = la.finish()
        err = la.stderr()
        for r, (ip, unit) in placed.items():
            assert ("worker rank %d on %s (unit %s) exited with status %d" %
                    (r, ip, unit, code)) in err
        assert rc != 0
    finally:
        la.kill()


def test_actor_death_kills_worker_and_launcher_death_kills_all(cluster, tmp_path):
    la = Launch(cluster, tmp_path, 2, strategy="SPREAD")
    try:
        placed = la.wait_ready()
        recs = la.records(2)
        victim = secrets.randbelow(2)
        os.kill(recs[victim]["ppid"], signal.SIGKILL)  # the actor process
        wait_until(lambda: gone(recs[victim]["pid"]), 20, "the orphaned worker to die")
        wait_until(lambda: "actor of worker rank %d" % victim in la.stderr(), 20,
                   "the launcher to report the dead actor")
        assert placed[victim][0] in la.stderr()
        other = recs[1 - victim]["pid"]
        assert not gone(other)
        la.p.kill()  # the launcher dies without a word: Ray reaps its actors, they their workers
        la.p.wait()
        wait_until(lambda: gone(other), 40, "the last worker to die with the launcher")
    finally:
        la.kill()


def test_missing_key(cluster, tmp_path):
    key = "ts_missing_%s" % secrets.token_hex(3)
    err = run_failing(cluster, tmp_path, n=1 + secrets.randbelow(3), key=key)
    assert 'no node of the Ray cluster at %s advertises the resource "%s"' % (
        cluster.address, key) in err
    for ip in cluster.ips:
        assert re.search(r"^  %s\s" % re.escape(ip), err, re.M), err
    assert "ray start --address=%s --resources='{\"%s\": 1}'" % (cluster.address, key) in err


def test_too_few_units(cluster, tmp_path):
    total = NODE_UNITS * len(cluster.ips)
    n = total + 1 + secrets.randbelow(3)
    err = run_failing(cluster, tmp_path, n=n)
    assert 'cannot place %d workers (one unit of "tessera_cpu" each)' % n in err
    assert 'has %d units of "tessera_cpu"' % total in err
    assert "--resources='{\"tessera_cpu\": 1}'" in err
    for ip in cluster.ips:
        assert ip in err


def test_busy_units_wait_then_fail(cluster, tmp_path):
    total = NODE_UNITS * len(cluster.ips)
    holder = Launch(cluster, tmp_path, total, strategy="SPREAD")  # holds every unit
    try:
        holder.wait_ready()
        timeout = 6 + secrets.randbelow(3)
        err = run_failing(cluster, tmp_path, n=1, timeout=timeout, within=timeout + 30)
        assert re.search(r'waiting for 1 unit of "tessera_cpu" \(%d in the cluster, 0 free'
                         % total, err)
        assert "cannot place 1 worker within %gs" % timeout in err
        assert "only 0 free" in err and "raise --ray-placement-timeout" in err
    finally:
        holder.close_stdin()
        holder.finish()
        holder.kill()


def test_address_mismatch(cluster, tmp_path):
    err = run_failing(cluster, tmp_path, n=2, strategy="SPREAD",
                      extra_env={"TESSERA_HOST_IP": "127.0.0.1"}, driver="127.0.0.1:40000")
    assert ("tessera's address for this node is 127.0.0.1 (from TESSERA_HOST_IP" in err), err
    assert "Ray knows this node as %s" % cluster.ips[0] in err
    assert "TESSERA_HOST_IP=%s" % cluster.ips[0] in err
    assert "cannot reach 127.0.0.1" in err


def test_address_mismatch_is_a_warning_when_every_worker_is_local(cluster, tmp_path):
    # ts_head exists only on the head, where the launcher runs: loopback reaches the worker.
    la = Launch(cluster, tmp_path, 1, key="ts_head", extra_env={"TESSERA_HOST_IP": "127.0.0.1"},
                driver="127.0.0.1:40000")
    try:
        placed = la.wait_ready()
        assert placed == {0: (cluster.ips[0], "0")}
        err = la.stderr()
        assert ("tessera's address for this node is 127.0.0.1 (from TESSERA_HOST_IP; the driver "
                "listens on 127.0.0.1) but Ray knows this node as %s: set TESSERA_HOST_IP=%s"
                % (cluster.ips[0], cluster.ips[0])) in err, err
        assert "cannot reach" not in err
    finally:
        la.close_stdin()
        la.finish()
        la.kill()


def test_ray_not_installed(cluster, tmp_path):
    # -S: no site-packages, so no Ray, but PYTHONPATH still finds tessera_ray.
    err = run_failing(cluster, tmp_path, n=1, python=[sys.executable, "-S"], within=10)
    assert err.strip().splitlines()[-1].endswith("Ray is not installed for %s: pip install ray"
                                                 % sys.executable)


def test_no_cluster_at_address(cluster, tmp_path):
    port = 20000 + secrets.randbelow(10000)
    addr = "%s:%d" % (cluster.ips[1], port)
    err = run_failing(cluster, tmp_path, n=1, address=addr, within=15)
    assert "no Ray cluster at %s" % addr in err
    assert "ray start --head --port=%d" % port in err


def test_no_cluster_auto(cluster, tmp_path):
    err = run_failing(cluster, tmp_path, n=1, address="auto",
                      extra_env={"RAY_ADDRESS": "", "RAY_TMPDIR": str(tmp_path)})
    assert "no Ray cluster found on this machine" in err


# ---- end to end: tessera serve --distributed-executor-backend ray across the two nodes -----

HTTP_CLIENT = r"""
import json, sys, urllib.request
port, body = sys.argv[1], sys.argv[2]
req = urllib.request.Request("http://127.0.0.1:%s/v1/completions" % port, data=body.encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    sys.stdout.write(r.read().decode())
"""


class NsServe:
    """`tessera serve` inside the head node's namespace; its HTTP API is reached from there."""

    def __init__(self, cluster, exe, model, *args):
        env = cluster.env()
        env["TESSERA_PYTHON"] = sys.executable
        env.pop("TESSERA_HOST_IP", None)
        self.cluster = cluster
        self.proc = subprocess.Popen(cluster.exec_argv(0, [
            exe, "serve", str(model), "--host", "127.0.0.1", "--port", "0",
            "--served-model-name", "tiny", "--max-model-len", "256",
            "--distributed-executor-backend", "ray", "--ray-address", cluster.address,
            *map(str, args)]), env=env, stderr=subprocess.PIPE, text=True)
        self.log = []
        self.port = None
        got = threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"on http://[^:]+:(\d+)", line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    got.set()
            got.set()

        threading.Thread(target=drain, daemon=True).start()
        if not got.wait(150) or self.port is None:
            self.stop()
            raise AssertionError("ray serve did not start:\n" + self.text())

    def text(self):
        return "".join(self.log)

    def complete(self, prompts, max_tokens):
        body = json.dumps({"model": "tiny", "prompt": prompts, "max_tokens": max_tokens,
                           "temperature": 0, "ignore_eos": True})
        r = subprocess.run(self.cluster.exec_argv(0, [sys.executable, "-c", HTTP_CLIENT,
                                                      str(self.port), body]),
                           capture_output=True, text=True, timeout=150)
        assert r.returncode == 0, r.stderr + self.text()
        choices = sorted(json.loads(r.stdout)["choices"], key=lambda c: c["index"])
        return [c["text"] for c in choices]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def tessera_workers(cluster):
    """Pids of `tessera worker` processes in the cluster's namespaces."""
    out = []
    for p in cluster.pids():
        try:
            argv = open("/proc/%d/cmdline" % p, "rb").read().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and argv[0].endswith(b"tessera") and argv[1] == b"worker":
            out.append(p)
    return out


@pytest.fixture(scope="module")
def uni_reference(tessera, shared):
    from dist_helpers import Serve, rand_prompt
    model = shared / "models" / "stories260K-hf"
    prompts = [rand_prompt() for _ in range(4)]
    s = Serve(tessera, model, "--max-model-len", 256)
    try:
        return model, prompts, s.complete(prompts, 24, ignore_eos=True)
    finally:
        s.proc.terminate()
        s.proc.wait(30)


_uni_cache = {}


def model_and_want(name, tessera, shared, checkpoints, uni_reference):
    """The model's path, prompts and uni's greedy texts: stories260K's from uni_reference, a tiny
    checkpoint's from one uni server (outside the namespaces) the first time it is asked for."""
    if name == "stories260K":
        return uni_reference
    if name not in _uni_cache:
        from dist_helpers import Serve, rand_prompt
        # An absolute path under the checkout: the namespaces share the filesystem, so the
        # workers on both nodes open the same files.
        model = checkpoints[name]["hf"].resolve()
        prompts = [rand_prompt() for _ in range(3)]
        s = Serve(tessera, model, "--max-model-len", 256)
        try:
            _uni_cache[name] = (model, prompts, s.complete(prompts, 24, ignore_eos=True))
        finally:
            s.proc.terminate()
            s.proc.wait(30)
    return _uni_cache[name]


@pytest.mark.parametrize("name,tp,pp,end", [
    ("stories260K", 2, 1, "SIGTERM"), ("stories260K", 1, 2, "SIGKILL"),
    ("stories260K", 2, 2, "SIGTERM"), ("tiny-qwen3", 2, 2, "SIGKILL"),
    ("tiny-llama", 2, 2, "SIGTERM")])
def test_serve_across_nodes_matches_uni(cluster, tessera, shared, checkpoints, uni_reference,
                                        name, tp, pp, end):
    model, prompts, want = model_and_want(name, tessera, shared, checkpoints, uni_reference)
    s = NsServe(cluster, tessera, model, "--tensor-parallel-size", tp,
                "--pipeline-parallel-size", pp, "--ray-placement-strategy", "SPREAD",
                "--ray-placement-timeout", 30)
    try:
        assert s.complete(prompts, 24) == want, s.text()
        log = s.text()
        units = {}  # node -> the units its workers were given
        for r in range(tp * pp):
            m = re.search(r"ray executor: rank %d -> node (\S+), unit (\d+), device cpu" % r, log)
            assert m, log
            node, unit = m.group(1).rstrip(","), m.group(2)
            units.setdefault(node, []).append(unit)
            # The worker's own line, relayed from its node through Ray.
            assert re.search(r"worker rank %d \(tp %d/%d, pp %d/%d\) on node %s, unit %s, "
                             r"device cpu" % (r, r % tp, tp, r // tp, pp, re.escape(node), unit),
                             log), log
        assert set(units) == set(cluster.ips), log
        # A node's workers are numbered 0, 1, ... on that node (a custom resource has no ids).
        for node, got in units.items():
            assert sorted(got) == [str(i) for i in range(len(got))], (node, log)
        assert len(tessera_workers(cluster)) == tp * pp
        if end == "SIGKILL":  # a driver that dies without a word takes its workers along
            s.proc.kill()
            s.proc.wait()
    finally:
        s.stop()
    # Stopping (or killing) the server stops every worker on every node.
    wait_until(lambda: not tessera_workers(cluster), 40, "the workers to stop with the server")


def test_serve_reports_placement_failure(cluster, tessera, uni_reference):
    model = uni_reference[0]
    key = "ts_absent_%s" % secrets.token_hex(3)
    env = cluster.env()
    env["TESSERA_PYTHON"] = sys.executable
    r = subprocess.run(cluster.exec_argv(0, [
        tessera, "serve", str(model), "--host", "127.0.0.1", "--port", "0",
        "--distributed-executor-backend", "ray", "--ray-address", cluster.address,
        "--tensor-parallel-size", "2", "--ray-device-key", key]),
        env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode != 0
    # The launcher's paragraph reaches the user verbatim through the driver.
    assert 'advertises the resource "%s"' % key in r.stderr, r.stderr
    assert "ray start --address=%s --resources='{\"%s\": 1}'" % (cluster.address, key) in r.stderr


def test_serve_restarts_workers_on_ray(cluster, tessera, uni_reference):
    model, prompts, want = uni_reference
    s = NsServe(cluster, tessera, model, "--tensor-parallel-size", 2, "--restart-workers",
                "--ray-placement-strategy", "SPREAD", "--ray-placement-timeout", 30)
    try:
        before = tessera_workers(cluster)
        assert len(before) == 2
        os.kill(before[secrets.randbelow(2)], signal.SIGKILL)
        wait_until(lambda: "every worker is back" in s.text(), 90, "the workers to come back")
        after = tessera_workers(cluster)
        assert len(after) == 2 and not set(after) & set(before)
        assert s.complete(prompts, 24) == want, s.text()
    finally:
        s.stop()
    wait_until(lambda: not tessera_workers(cluster), 40, "the workers to stop with the server")


def test_serve_survives_no_hang_when_a_node_vanishes(cluster, tessera, uni_reference):
    """Last in this file: it cuts node 1 off the network. The driver must notice the silent
    worker (ping timeout), fail, and exit on its own: nothing waits forever on the lost node."""
    model = uni_reference[0]
    s = NsServe(cluster, tessera, model, "--tensor-parallel-size", 2,
                "--ray-placement-strategy", "SPREAD", "--ray-placement-timeout", 30)
    try:
        m = re.search(r"ray executor: rank (\d) -> node %s," % re.escape(cluster.ips[1]),
                      s.text())
        assert m, s.text()
        lost = int(m.group(1))
        netns.sh("ip", "-n", cluster.ns[1], "link", "set", "eth0", "down")
        try:
            code = s.proc.wait(90)
        except subprocess.TimeoutExpired:
            raise AssertionError("tessera serve hung after losing a node:\n" + s.text())
        assert code != 0
        assert "worker rank %d on %s" % (lost, cluster.ips[1]) in s.text(), s.text()
        # The launcher stopped within the driver's grace period, not by a signal's stack dump.
        assert "SIGTERM received" not in s.text(), s.text()
    finally:
        s.stop()
        netns.sh("ip", "-n", cluster.ns[1], "link", "set", "eth0", "up", check=False)
