"""tessera's Ray launcher: started by `tessera serve --distributed-executor-backend ray`, it
places one worker per unit of a Ray resource (a placement group of N bundles {KEY: 1}), starts
`<worker argv> --rank R --unit U --node-ip IP` in one Ray actor per bundle, and tells the driver
where each one went. Protocol with the driver: stdout carries only `PLACED <rank> <ip> <unit>`
lines then `READY`; a failure is one paragraph on stderr and a non-zero exit; stdin EOF (the
driver died or is done) stops every worker. Nothing here may wait without a deadline.
"""
import argparse
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

EXIT_FAIL = 1
EXIT_WORKER = 3

PROGRESS_EVERY_S = 5.0
CONNECT_TIMEOUT_S = 3.0
INIT_TIMEOUT_S = 30.0
STOP_GRACE_S = 2.0  # the driver allows the launcher 5 s to stop before it signals


class LaunchError(Exception):
    """A failure the user must fix; its text is the paragraph printed on stderr."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python3 -m tessera_ray.launch",
                                description="Place tessera workers on a Ray cluster.")
    p.add_argument("--address", default="auto")
    p.add_argument("--num-workers", type=int, required=True)
    p.add_argument("--device-key", default="tessera_cpu")
    p.add_argument("--device-env", default="TESSERA_CPU_DEVICES")
    p.add_argument("--strategy", default="PACK", type=str.upper, choices=("PACK", "SPREAD"))
    p.add_argument("--placement-timeout", type=float, default=60.0)
    p.add_argument("--driver", required=True, help="HOST:PORT the workers connect to")
    p.add_argument("--secret-env", default="TESSERA_SECRET")
    p.add_argument("worker", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if a.worker and a.worker[0] == "--":
        a.worker = a.worker[1:]
    if not a.worker:
        p.error("missing worker argv after --")
    if a.num_workers < 1:
        p.error("--num-workers must be >= 1")
    return a


# ---- addresses ----------------------------------------------------------------------------

def split_host_port(s):
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        return host, int(rest.lstrip(":"))
    host, _, port = s.rpartition(":")
    if not host:
        raise ValueError(s)
    return host, int(port)


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def route_address(target_host):
    """The local address the kernel would use to reach target_host (UDP connect sends nothing)."""
    try:
        infos = socket.getaddrinfo(target_host, 9, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, _, _, _, sockaddr in infos:
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.connect(sockaddr)
            return s.getsockname()[0]
        except OSError:
            continue
        finally:
            s.close()
    return None


def this_host_address(gcs_host):
    """As the C side resolves it: TESSERA_HOST_IP, else the interface that reaches the Ray GCS
    (the default route when the GCS is on loopback), else loopback."""
    env = os.environ.get("TESSERA_HOST_IP")
    if env:
        return env, "TESSERA_HOST_IP"
    if gcs_host and not is_loopback(gcs_host):
        ip = route_address(gcs_host)
        if ip:
            return ip, "the route to the Ray GCS at %s" % gcs_host
    # A documentation address: connect() on UDP only consults the routing table.
    ip = route_address("192.0.2.1")
    if ip:
        return ip, "the default route"
    return "127.0.0.1", "no route (loopback)"


def resolve_ray_address(address):
    """'auto' means RAY_ADDRESS, else the cluster `ray start` recorded on this machine."""
    if address and address != "auto":
        return address
    env = os.environ.get("RAY_ADDRESS")
    if env and env != "auto":
        return env
    try:
        from ray._common.utils import get_ray_address_file
        path = get_ray_address_file(None)
    except Exception:  # private API moved: Ray's default place
        path = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")
    try:
        with open(path) as f:
            found = f.read().strip()
    except OSError:
        found = ""
    if not found:
        raise LaunchError(
            "tessera: no Ray cluster found on this machine (--ray-address auto: RAY_ADDRESS is "
            "unset and `ray start` has not run here). Start one with\n"
            "  ray start --head --resources='{\"tessera_cpu\": 1}'\n"
            "or point tessera at a running cluster with RAY_ADDRESS=HOST:6379.")
    return found


def check_reachable(address):
    try:
        host, port = split_host_port(address.replace("ray://", ""))
    except ValueError:
        raise LaunchError("tessera: bad Ray address %r: expected HOST:PORT." % address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise LaunchError(
            "tessera: no Ray cluster at %s (%s). Start the head there with `ray start --head "
            "--port=%d`, or fix RAY_ADDRESS / --ray-address." % (address, e.strerror or e, port))
    return host


# ---- cluster facts and messages -----------------------------------------------------------

def alive_nodes(ray):
    return [n for n in ray.nodes() if n.get("Alive")]


def fmt_amount(name, v):
    if name in ("memory", "object_store_memory"):
        return "%.1fGiB" % (v / 2**30)
    return ("%g" % v)


def node_lines(nodes, key, free=None):
    lines = []
    for n in sorted(nodes, key=lambda n: n["NodeManagerAddress"]):
        res = n.get("Resources", {})
        head = "node:__internal_head__" in res
        shown = ", ".join("%s=%s" % (k, fmt_amount(k, v)) for k, v in sorted(res.items())
                          if not k.startswith("node:") and "_group_" not in k)
        extra = ""
        if free is not None and res.get(key):
            extra = "  (%s free: %g)" % (key, free.get(n["NodeID"], 0.0))
        lines.append("  %-15s %s %s%s" % (n["NodeManagerAddress"], "head" if head else "    ",
                                          shown or "(no resources)", extra))
    return lines


def fix_line(key, address):
    if key == "GPU":
        return ("Ray counts GPUs itself (key \"GPU\"); add nodes with GPUs, or start them with\n"
                "  ray start --address=%s --num-gpus=1" % address)
    return ("Start each Ray node with the units it offers, e.g.\n"
            "  ray start --address=%s --resources='{\"%s\": 1}'\n"
            "(and on the head: ray start --head --resources='{\"%s\": 1}')."
            % (address, key, key))


def shortage_message(key, n, address, nodes):
    total = sum(nd.get("Resources", {}).get(key, 0.0) for nd in nodes)
    if total == 0:
        what = "no node of the Ray cluster at %s advertises the resource \"%s\"" % (address, key)
    else:
        what = ("the Ray cluster at %s has %g unit%s of \"%s\"" %
                (address, total, "" if total == 1 else "s", key))
    return "\n".join(
        ["tessera: cannot place %d worker%s (one unit of \"%s\" each): %s." %
         (n, "" if n == 1 else "s", key, what),
         "Nodes (%d alive):" % len(nodes)] + node_lines(nodes, key) + [fix_line(key, address)])


def free_per_node(ray, nodes, key):
    """Units of key free on each node, from the GCS's per-node available resources."""
    try:
        from ray._private.state import state
        avail = state._available_resources_per_node()
    except Exception:  # private API: degrade to the cluster total
        return None
    return {nid: res.get(key, 0.0) for nid, res in avail.items()}


def busy_message(key, n, address, nodes, free, waited):
    total = sum(nd.get("Resources", {}).get(key, 0.0) for nd in nodes)
    nfree = sum(free.values()) if free else 0
    return "\n".join(
        ["tessera: cannot place %d worker%s within %gs: the Ray cluster at %s has %g unit%s of "
         "\"%s\" but only %g free; others hold the rest (another tessera or Ray job)." %
         (n, "" if n == 1 else "s", waited, address, total, "" if total == 1 else "s", key,
          nfree),
         "Nodes (%d alive):" % len(nodes)] + node_lines(nodes, key, free) +
        ["Stop the job that holds them, raise --ray-placement-timeout, or add units:",
         fix_line(key, address)])


# ---- the launch ---------------------------------------------------------------------------

class Launcher:
    def __init__(self, args, proto_out):
        self.a = args
        self.out = proto_out
        self.stop = threading.Event()
        self.pg = None
        self.actors = []
        self.ray = None

    def log(self, msg):
        sys.stderr.write(msg.rstrip("\n") + "\n")
        sys.stderr.flush()

    def emit(self, line):
        self.out.write(line + "\n")
        self.out.flush()

    def connect(self):
        a = self.a
        try:
            import ray
        except ImportError:
            raise LaunchError("tessera: Ray is not installed for %s: pip install ray" %
                              sys.executable)
        self.ray = ray
        address = resolve_ray_address(a.address)
        gcs_host = check_reachable(address)
        self.address = address
        done, failure = threading.Event(), []

        def init():
            try:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=True,
                         configure_logging=True)
            except Exception as e:  # anything ray.init raises becomes the user's one line
                failure.append(e)
            done.set()

        threading.Thread(target=init, daemon=True).start()
        if not done.wait(INIT_TIMEOUT_S):
            raise LaunchError("tessera: timed out after %gs connecting to the Ray cluster at %s "
                              "(the port answers, but Ray did not); check `ray status` there." %
                              (INIT_TIMEOUT_S, address))
        if failure:
            first = str(failure[0]).strip().splitlines()
            raise LaunchError("tessera: cannot connect to the Ray cluster at %s: %s" %
                              (address, first[0] if first else type(failure[0]).__name__))
        self.gcs_host = gcs_host

    def place(self):
        a, ray = self.a, self.ray
        from ray.util.placement_group import placement_group, remove_placement_group
        key, n = a.device_key, a.num_workers
        nodes = alive_nodes(ray)
        total = sum(nd.get("Resources", {}).get(key, 0.0) for nd in nodes)
        if total < n:
            raise LaunchError(shortage_message(key, n, self.address, nodes))
        self.pg = placement_group([{key: 1.0} for _ in range(n)], strategy=a.strategy,
                                  name="tessera-%d" % os.getpid())
        start = time.monotonic()
        next_note = start + PROGRESS_EVERY_S
        while True:
            remaining = a.placement_timeout - (time.monotonic() - start)
            ready, _ = ray.wait([self.pg.ready()], timeout=max(0.0, min(1.0, remaining)))
            if ready:
                break
            if self.stop.is_set():
                raise LaunchError("tessera: stopped while waiting for placement.")
            now = time.monotonic()
            if now - start >= a.placement_timeout:
                nodes = alive_nodes(ray)
                free = free_per_node(ray, nodes, key) or {}
                remove_placement_group(self.pg)
                self.pg = None
                raise LaunchError(busy_message(key, n, self.address, nodes, free,
                                               a.placement_timeout))
            if now >= next_note:
                nodes = alive_nodes(ray)
                free = free_per_node(ray, nodes, key)
                nfree = sum(free.values()) if free else ray.available_resources().get(key, 0)
                self.log("tessera: waiting for %d unit%s of \"%s\" (%g in the cluster, %g free; "
                         "others hold the rest) %ds/%gs" %
                         (n, "" if n == 1 else "s", key,
                          sum(nd.get("Resources", {}).get(key, 0.0) for nd in nodes), nfree,
                          now - start, a.placement_timeout))
                next_note = now + PROGRESS_EVERY_S
        table = ray.util.placement_group_table(self.pg)
        by_id = {nd["NodeID"]: nd for nd in alive_nodes(ray)}
        return [by_id.get(table["bundles_to_node_id"][i], {}) for i in range(n)]

    def check_addresses(self, placed_nodes):
        """The driver's address against the one Ray knows this node by."""
        ray = self.ray
        mine, how = this_host_address(self.gcs_host)
        driver_host, _ = split_host_port(self.a.driver)
        ray_ip = ray._private.worker.global_worker.node_ip_address
        here = ray.get_runtime_context().get_node_id()
        remote = [nd.get("NodeManagerAddress") for nd in placed_nodes
                  if nd.get("NodeID") != here]
        if driver_host == ray_ip and mine == ray_ip:
            return
        other = driver_host if driver_host != ray_ip else mine
        fix = "set TESSERA_HOST_IP=%s for tessera" % ray_ip
        if not is_loopback(other):
            fix += ", or start Ray here with `ray start --node-ip-address=%s ...`" % other
        line = ("tessera: address mismatch: tessera's address for this node is %s (from %s; "
                "the driver listens on %s) but Ray knows this node as %s: %s." %
                (mine, how, driver_host, ray_ip, fix))
        if remote and is_loopback(driver_host):
            raise LaunchError(line + "\nWorkers on other nodes (%s) cannot reach %s." %
                              (", ".join(sorted(set(remote))), driver_host))
        self.log(line)

    def start_workers(self, placed_nodes):
        a, ray = self.a, self.ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        import ray.cloudpickle
        from tessera_ray import actor as actor_mod
        # Ship the actor's code with it: worker nodes need not have tessera's python/ on a path.
        ray.cloudpickle.register_pickle_by_value(actor_mod)
        Host = ray.remote(num_cpus=0, max_concurrency=4, max_restarts=0)(actor_mod.WorkerHost)
        key, n = a.device_key, a.num_workers
        # Ray takes GPUs only through num_gpus (resources={"GPU": ...} is refused); it then
        # lists the actor's GPU among its accelerator ids and sets CUDA_VISIBLE_DEVICES itself.
        unit_opt = {"num_gpus": 1} if key == "GPU" else {"resources": {key: 1.0}}
        for i in range(n):
            h = Host.options(**unit_opt, scheduling_strategy=
                             PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                             name=None).remote(key)
            self.actors.append(h)
        deadline = max(30.0, a.placement_timeout)
        infos = self.get_all([h.info.remote() for h in self.actors], deadline, "start actors")
        units = assign_units(infos)
        secret = os.environ.get(a.secret_env, "")
        starts = []
        for r, (h, inf) in enumerate(zip(self.actors, infos)):
            argv = list(a.worker) + ["--rank", str(r), "--unit", units[r], "--node-ip", inf[1]]
            env = {a.device_env: units[r], a.secret_env: secret}
            starts.append(h.start.remote(argv, env))
        self.get_all(starts, deadline, "start workers")
        for r, inf in enumerate(infos):
            self.emit("PLACED %d %s %s" % (r, inf[1], units[r]))
        self.infos, self.units = infos, units
        self.emit("READY")

    def get_all(self, refs, timeout, what):
        ray = self.ray
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            raise LaunchError("tessera: Ray did not %s within %gs (%d of %d answered); check "
                              "`ray status` and the Ray logs." % (what, timeout, len(ready),
                                                                  len(refs)))
        try:
            return ray.get(refs, timeout=timeout)
        except Exception as e:
            msg = str(e).strip().splitlines()
            raise LaunchError("tessera: could not %s on the Ray cluster: %s" %
                              (what, msg[-1] if msg else type(e).__name__))

    def watch(self):
        """Until stdin EOF or every worker exits: report each exit on stderr."""
        ray = self.ray
        waits = {h.wait.remote(): r for r, h in enumerate(self.actors)}
        worst = 0
        while waits and not self.stop.is_set():
            ready, _ = ray.wait(list(waits), num_returns=1, timeout=0.5)
            for ref in ready:
                r = waits.pop(ref)
                ip, unit = self.infos[r][1], self.units[r]
                try:
                    code = ray.get(ref)
                    self.log("tessera: worker rank %d on %s (unit %s) exited with %s" %
                             (r, ip, unit, describe_status(code)))
                    if code != 0:
                        worst = EXIT_WORKER
                except Exception:
                    self.log("tessera: the Ray actor of worker rank %d on %s (unit %s) died "
                             "(its node may be gone); the worker died with it" % (r, ip, unit))
                    worst = EXIT_WORKER
                try:
                    ray.kill(self.actors[r], no_restart=True)
                except Exception:
                    pass
        return worst

    def teardown(self):
        ray = self.ray
        if ray is None or not ray.is_initialized():
            return
        if self.actors:
            try:
                ray.wait([h.stop.remote(STOP_GRACE_S) for h in self.actors],
                         num_returns=len(self.actors), timeout=STOP_GRACE_S + 1)
            except Exception:
                pass
            for h in self.actors:
                try:
                    ray.kill(h, no_restart=True)
                except Exception:
                    pass
        if self.pg is not None:
            try:
                from ray.util.placement_group import remove_placement_group
                remove_placement_group(self.pg)
            except Exception:
                pass


def assign_units(infos):
    """Ray gives distinct instance ids for GPUs (and other unit-instance resources), but every
    holder of a plain custom resource sees id 0. Keep Ray's ids when they tell the bundles on a
    node apart; otherwise number that node's bundles 0, 1, ... in bundle order."""
    by_node = {}
    for r, (node_id, _, ids, _) in enumerate(infos):
        by_node.setdefault(node_id, []).append(r)
    units = [None] * len(infos)
    for node_id, ranks in by_node.items():
        first = [infos[r][2][0] if infos[r][2] else None for r in ranks]
        if None not in first and len(set(first)) == len(first):
            for r, u in zip(ranks, first):
                units[r] = str(u)
        else:
            for i, r in enumerate(ranks):
                units[r] = str(i)
    return units


def describe_status(code):
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return "signal %s" % signal.Signals(-code).name
        except ValueError:
            return "signal %d" % -code
    return "status %d" % code


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Every worker's log lines, uncoloured: Ray folds look-alike lines of several actors into one.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # The protocol owns the real stdout; anything else that writes there (Ray's own prints,
    # forwarded actor output) goes to stderr instead.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if args.secret_env not in os.environ:
        sys.stderr.write("tessera: the launch secret is missing: environment variable %s is "
                         "unset.\n" % args.secret_env)
        return EXIT_FAIL
    launcher = Launcher(args, proto)

    def on_stdin_eof():
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        launcher.stop.set()

    threading.Thread(target=on_stdin_eof, daemon=True).start()
    def quiet_stop():
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: launcher.stop.set())

    quiet_stop()
    code = 0
    try:
        launcher.connect()
        # Ray's core worker installs its own SIGTERM handler (a stack dump, then death); a
        # signal from the driver means "stop", which teardown does quietly.
        quiet_stop()
        placed = launcher.place()
        launcher.check_addresses(placed)
        launcher.start_workers(placed)
        code = launcher.watch()
    except LaunchError as e:
        sys.stderr.write(str(e).rstrip("\n") + "\n")
        code = EXIT_FAIL
    finally:
        try:
            launcher.teardown()
        except Exception:
            pass
        sys.stderr.flush()
        try:
            proto.flush()
        except Exception:
            pass
    # ray.shutdown() can take seconds and nothing is left to clean: the actors are killed and
    # the placement group removed, and the GCS reaps this driver's leftovers when it goes.
    os._exit(code)


if __name__ == "__main__":
    main()
