"""A multi-node Ray cluster on one machine for the Ray tests: each node in its own network
namespace with its own address (10.77.<k>.<i>/24 on one veth or bridge link that exists only
inside the namespaces), the head in the first. Everything it creates it removes: the processes
that run in its namespaces are killed by namespace (never by name, so no other Ray on the machine
is touched), then the namespaces and links are deleted."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

VENV_BIN = os.path.dirname(sys.executable)


def available():
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "iproute2 (ip) is not installed"
    name = "tsprobe%d" % os.getpid()
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return "ip netns add failed: " + r.stderr.strip()
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def sh(*argv, check=True):
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(argv), r.stderr.strip()))
    return r


class RayCluster:
    """n Ray nodes, node i in namespace self.ns[i] with address self.ips[i]; resources[i] is the
    custom-resource dict of node i's `ray start --resources`."""

    def __init__(self, resources, temp_dir, port=6379):
        self.n = len(resources)
        self.resources = resources
        self.port = port
        self.temp_dir = temp_dir
        tag = "%04x" % random.getrandbits(16)
        self.subnet = random.randint(64, 250)
        self.ns = ["ts%s-n%d" % (tag, i) for i in range(self.n)]
        self.ips = ["10.77.%d.%d" % (self.subnet, i + 1) for i in range(self.n)]
        self.bridge_ns = "ts%s-br" % tag
        self.tag = tag
        self.made = []
        self.started = False

    @property
    def address(self):
        return "%s:%d" % (self.ips[0], self.port)

    def exec_argv(self, i, argv):
        return ["ip", "netns", "exec", self.ns[i]] + list(argv)

    def env(self):
        e = dict(os.environ)
        e["PATH"] = VENV_BIN + os.pathsep + e.get("PATH", "")
        e["RAY_USAGE_STATS_ENABLED"] = "0"
        e.pop("RAY_ADDRESS", None)
        return e

    def create_network(self):
        # A bridge in its own namespace joins the nodes: node i's veth end sits in ns[i].
        sh("ip", "netns", "add", self.bridge_ns)
        self.made.append(self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, ns in enumerate(self.ns):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "p%d" % i,
               "netns", self.bridge_ns)
            sh("ip", "-n", self.bridge_ns, "link", "set", "p%d" % i, "master", "br0")
            sh("ip", "-n", self.bridge_ns, "link", "set", "p%d" % i, "up")
            sh("ip", "-n", ns, "addr", "add", "%s/24" % self.ips[i], "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            # The default route leads only onto the bridge: "the interface with the default route"
            # (how tessera and Ray pick a node's address) is then the node's own eth0.
            sh("ip", "-n", ns, "route", "add", "default", "dev", "eth0")

    def ray_resources(self, i):
        """Node i's `ray start` resource flags: GPUs through --num-gpus (Ray refuses "GPU" among
        custom resources; with the flag it believes a node without GPUs has them)."""
        res = dict(self.resources[i])
        gpus = res.pop("GPU", None)
        return ["--resources=%s" % json.dumps(res)] + (["--num-gpus=%d" % gpus] if gpus else [])

    def start(self, timeout=120):
        self.create_network()
        common = ["--object-store-memory=78643200", "--num-cpus=1", "--disable-usage-stats",
                  "--temp-dir=%s" % self.temp_dir]
        head = ["ray", "start", "--head", "--port=%d" % self.port, "--node-ip-address=%s" %
                self.ips[0], "--include-dashboard=false"] + self.ray_resources(0) + common
        r = subprocess.run(self.exec_argv(0, head), env=self.env(), capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError("ray start --head failed:\n" + r.stdout + r.stderr)
        for i in range(1, self.n):
            node = ["ray", "start", "--address=%s" % self.address, "--node-ip-address=%s" %
                    self.ips[i]] + self.ray_resources(i) + common
            r = subprocess.run(self.exec_argv(i, node), env=self.env(), capture_output=True,
                               text=True, timeout=timeout)
            if r.returncode != 0:
                raise RuntimeError("ray start (node %d) failed:\n%s%s" % (i, r.stdout, r.stderr))
        self.started = True
        self.wait_nodes(self.n, timeout)

    def wait_nodes(self, n, timeout):
        code = ("import ray,sys; ray.init(address=%r, logging_level='ERROR'); "
                "print(sum(1 for x in ray.nodes() if x['Alive']))" % self.address)
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(self.exec_argv(0, [sys.executable, "-c", code]), env=self.env(),
                               capture_output=True, text=True, timeout=timeout)
            if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the Ray cluster did not reach %d nodes: %s %s" %
                                   (n, r.stdout, r.stderr))
            time.sleep(1)

    def pids(self):
        out = []
        for ns in self.ns:
            r = sh("ip", "netns", "pids", ns, check=False)
            out += [int(p) for p in r.stdout.split()]
        return out

    def stop(self):
        """Kills every process in the namespaces (Ray's daemons, actors, tessera processes),
        then deletes the namespaces; safe to call more than once and after a failed start."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.pids():
                break
        for ns in reversed(self.made):
            sh("ip", "netns", "del", ns, check=False)
        self.made = []
        shutil.rmtree(self.temp_dir, ignore_errors=True)
