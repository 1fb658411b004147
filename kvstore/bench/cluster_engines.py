"""Real distributed engines for the cluster-tier tests and `kvstore bench cluster`: a Mooncake
master and a 3-master Redis Cluster on free loopback ports, plus each engine's own client
(the tests corrupt values with it, the benchmark reads with it as the baseline).

Both start in seconds; ``skip_reason()`` says why one cannot run here (binary or package
missing), so tests skip with that reason instead of failing.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: every socket is held until all are picked (ports
    picked one at a time can repeat, and two nodes given one port left one running)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class PortTaken(RuntimeError):
    """The engine exited because one of its ports was bound by another process after it was
    picked: starting again on new ports may succeed (start_engine does)."""


def _wait_port(port: int, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:]
            why = PortTaken if "Address already in use" in tail else RuntimeError
            raise why(f"engine exited with {proc.returncode}:\n{tail}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"engine did not listen on {port} in {timeout_s}s")


def mooncake_master_binary() -> str | None:
    """The master beside this interpreter, on PATH, or inside the mooncake package (a venv
    that shares its packages with another has the binary only there)."""
    here = Path(sys.executable).parent / "mooncake_master"
    if here.exists():
        return str(here)
    found = shutil.which("mooncake_master")
    if found:
        return found
    try:
        import mooncake
    except ImportError:
        return None
    inside = Path(mooncake.__file__).parent / "mooncake_master"
    return str(inside) if inside.exists() else None


def skip_reason(backend: str) -> str | None:
    if backend == "mooncake":
        try:
            import mooncake.store  # noqa: F401
        except ImportError as exc:
            return (f"Mooncake client unavailable ({exc}): pip install '.[mooncake]' and "
                    "apt-get install libibverbs1")
        if mooncake_master_binary() is None:
            return "mooncake_master not found (pip install '.[mooncake]')"
        return None
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis client missing: pip install '.[redis]'"
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool} not found: apt-get install redis-server redis-tools"
    return None


class MooncakeMaster:
    """A mooncake_master process; stop()/start() restart it on the same port (no HA: a restart
    loses every object, as in production without etcd)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port, self.metrics_port = free_ports(2)
        self.proc: subprocess.Popen | None = None
        self.url = f"mooncake://127.0.0.1:{self.port}"

    def start(self) -> "MooncakeMaster":
        log = self.workdir / f"mooncake-master-{self.port}.log"
        self.proc = subprocess.Popen(
            [mooncake_master_binary(), "--rpc_address=127.0.0.1", f"--rpc_port={self.port}",
             "--metrics_host=127.0.0.1", f"--metrics_port={self.metrics_port}"],
            stdout=open(log, "a"), stderr=subprocess.STDOUT)
        _wait_port(self.port, 15, self.proc, log)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()


class RedisCluster:
    """Three Redis masters, no replicas, ``cluster-require-full-coverage no`` (a dead master
    costs its slots only). kill_node()/start_node() restart one master on its port; it rejoins
    with its slots from nodes.conf (and no data: persistence is off)."""

    N = 3

    def __init__(self, workdir: Path):
        self.workdir = workdir
        picked = free_ports(2 * self.N)
        self.ports = picked[:self.N]
        # the bus port defaults to port + 10000, which a free high port may overflow or find taken
        self.bus_ports = dict(zip(self.ports, picked[self.N:]))
        self.procs: dict[int, subprocess.Popen] = {}
        self.url = "redis://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _start_node(self, port: int) -> None:
        d = self.workdir / f"redis-{port}"
        d.mkdir(exist_ok=True)
        log = d / "redis.log"
        self.procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled",
             "yes", "--cluster-port", str(self.bus_ports[port]), "--cluster-config-file", "nodes.conf", "--dir", str(d), "--save", "",
             "--appendonly", "no", "--cluster-require-full-coverage", "no",
             "--cluster-node-timeout", "2000", "--protected-mode", "no", "--daemonize", "no"],
            stdout=open(log, "a"), stderr=subprocess.STDOUT)
        _wait_port(port, 15, self.procs[port], log)

    def start(self) -> "RedisCluster":
        for p in self.ports:
            self._start_node(p)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in self.ports], "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)
        self.wait_ok()
        return self

    def wait_ok(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ok = 0
            for p in self.ports:
                r = subprocess.run(["redis-cli", "-p", str(p), "cluster", "info"],
                                   capture_output=True, text=True, timeout=5)
                ok += "cluster_state:ok" in r.stdout
            if ok == len(self.ports):
                return
            time.sleep(0.1)
        raise RuntimeError("Redis Cluster did not reach cluster_state:ok")

    def kill_node(self, i: int = 0) -> None:
        p = self.procs[self.ports[i]]
        p.kill()
        p.wait()

    def start_node(self, i: int = 0) -> None:
        self._start_node(self.ports[i])

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def start_engine(backend: str, workdir: Path, attempts: int = 3):
    """A running engine; nothing is left running when starting it fails halfway.

    The ports are free when picked, but another process may bind one (an outgoing connection
    takes its port from the same range) before the engine does: then the engine starts again
    on new ports, up to ``attempts`` times in all."""
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        engine = MooncakeMaster(workdir) if backend == "mooncake" else RedisCluster(workdir)
        try:
            return engine.start()
        except PortTaken:
            engine.stop()
            if attempt == attempts - 1:
                raise
        except BaseException:
            engine.stop()
            raise


class RawClient:
    """The engine's own client, as a peer of the daemons (for corrupting values in tests and
    for the benchmark's baseline). Values are opaque bytes here."""

    def __init__(self, url: str):
        self.url = url
        scheme, _, rest = url.partition("://")
        self.scheme = scheme
        hosts = [(h, int(p)) for h, _, p in (x.rpartition(":") for x in rest.split(","))]
        if scheme == "mooncake":
            os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
            from mooncake.store import MooncakeDistributedStore, ReplicateConfig
            self.c = MooncakeDistributedStore()
            # no segment of its own: what it writes lives in the daemons' memory, not in a client
            # that closes before they read
            rc = self.c.setup("127.0.0.1", "P2PHANDSHAKE", 0, 64 << 20, "tcp", "",
                              f"{hosts[0][0]}:{hosts[0][1]}")
            assert rc == 0, f"mooncake setup failed: {rc}"
            self.cfg = ReplicateConfig()
            self.cfg.replica_num = 1
        else:
            from redis.cluster import ClusterNode, RedisCluster as RC
            self.c = RC(startup_nodes=[ClusterNode(h, p) for h, p in hosts],
                        require_full_coverage=False)

    def exists(self, key: str) -> bool:
        if self.scheme == "mooncake":
            return self.c.is_exist(key) == 1
        return bool(self.c.exists(key))

    def get(self, key: str) -> bytes:
        return bytes(self.c.get(key) or b"")

    def replace(self, key: str, value: bytes) -> None:
        if self.scheme == "mooncake":
            assert self.c.upsert(key, value, self.cfg) == 0
        else:
            assert self.c.set(key, value)

    def remove(self, key: str) -> None:
        if self.scheme == "mooncake":
            assert self.c.remove(key, True) == 0     # force: past the lease of a fresh put
        else:
            assert self.c.delete(key) == 1

    def close(self) -> None:
        self.c.close()

    # -- bulk calls for the benchmark's baseline ---------------------------------------------
    def register(self, buf) -> None:
        """Mooncake: register ``buf`` (a numpy array) for zero-copy puts and gets."""
        if self.scheme == "mooncake":
            assert self.c.register_buffer(buf.ctypes.data, buf.nbytes) == 0

    def put_many(self, keys: list[str], buf, size: int) -> None:
        """Store keys[i] = buf[i*size:(i+1)*size] in one batch (Mooncake batch_put_from,
        Redis one pipeline)."""
        if self.scheme == "mooncake":
            base = buf.ctypes.data
            rc = self.c.batch_put_from(keys, [base + i * size for i in range(len(keys))],
                                       [size] * len(keys), self.cfg)
            assert all(r == 0 for r in rc), rc
        else:
            mv = memoryview(buf).cast("B")
            pipe = self.c.pipeline(transaction=False)
            for i, k in enumerate(keys):
                pipe.set(k, mv[i * size:(i + 1) * size])
            assert all(pipe.execute())

    def get_many_into(self, keys: list[str], buf, size: int) -> None:
        """Read keys[i] into buf[i*size:(i+1)*size] in one batch (Mooncake batch_get_into,
        Redis one pipeline of GETs and a copy of each reply)."""
        if self.scheme == "mooncake":
            base = buf.ctypes.data
            rc = self.c.batch_get_into(keys, [base + i * size for i in range(len(keys))],
                                       [size] * len(keys))
            assert all(r == size for r in rc), rc
        else:
            mv = memoryview(buf).cast("B")
            pipe = self.c.pipeline(transaction=False)
            for k in keys:
                pipe.get(k)
            for i, v in enumerate(pipe.execute()):
                assert v is not None and len(v) == size
                mv[i * size:(i + 1) * size] = v
