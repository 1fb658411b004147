"""Configuration errors, health, reflection and graceful shutdown of a real daemon process."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
    ProtoReflectionDescriptorDatabase

from kvstore.client import KVClient
from kvstore.core.layout import KVLayout
from kvstore.v1 import kvstore_pb2 as pb


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True,
                          text=True, timeout=30, env={**e, **(env or {})})


@pytest.mark.parametrize("args, env, words", [
    (["--metrics-port", "70000"], {}, ["metrics_port", "--metrics-port", "65535"]),
    ([], {"KVSTORE_MAX_INFLIGHT_REQUESTS_PER_CLIENT": "0"},
     ["max_inflight_requests_per_client", "$KVSTORE_MAX_INFLIGHT_REQUESTS_PER_CLIENT", "> 0"]),
    (["--listen", "127.0.0.1:0"], {}, ["listen", "bearer-token"]),
    (["--tls-cert-file", "/x.pem"], {}, ["tls_cert_file", "tls_key_file"]),
    (["--socket-requires-token", "maybe"], {}, ["socket_requires_token", "true or false"]),
])
def test_config_errors_name_the_key(args, env, words):
    r = _cli("config", "--print", *args, env=env)
    assert r.returncode == 2, r.stdout
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_config_file_errors_and_print(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[metrics]\nport = 9100\nhost = "0.0.0.0"\nbogus = 1\n')
    r = _cli("config", "--config", str(bad))
    assert r.returncode == 2 and "metrics_bogus" in r.stderr and str(bad) in r.stderr
    good = tmp_path / "good.toml"
    good.write_text('[metrics]\nport = 9100\nhost = "0.0.0.0"\n')
    r = _cli("config", "--print", "--json", "--config", str(good),
             env={"KVSTORE_AUTH_TOKEN": "s3cret-s3cret-s3cret"})
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["metrics_port"] == 9100 and cfg["metrics_host"] == "0.0.0.0"   # numbers as numbers
    assert cfg["lease_timeout_s"] == 30.0 and cfg["socket_requires_token"] is False
    assert cfg["dram_bytes"] > 0 and isinstance(cfg["dram_bytes"], int)
    assert cfg["auth_token"] == "(set)"          # secrets are never printed
    r = _cli("config", "--print", "--config", str(good))
    line = next(l for l in r.stdout.splitlines() if l.startswith("metrics_port"))
    assert "9100" in line and str(good) in line


def test_health_and_reflection(daemon):
    with grpc.insecure_channel(f"unix:{daemon.socket}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "kvstore.v1.KVStore"):
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as exc:
            health.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND

        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"kvstore.v1.KVStore", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(db)
        svc = pool.FindServiceByName("kvstore.v1.KVStore")
        methods = {m.name for m in svc.methods}
        assert {"WatchStats", "ReportFallbacks", "GetStats", "Acquire"} <= methods
        watch = svc.FindMethodByName("WatchStats")
        assert watch.output_type.full_name == "kvstore.v1.Stats"


def _wait_exit(proc, timeout_s: float) -> tuple[int, float]:
    t0 = time.monotonic()
    rc = proc.wait(timeout_s)
    return rc, time.monotonic() - t0


def test_sigterm_drains_in_flight_stream_then_exits(daemon_factory):
    d = daemon_factory("--dram-bytes", "128MiB", "--chunk-bytes", "16MiB",
                       "--shutdown-grace-s", "5")
    layout = KVLayout(4, 8, 128, block_tokens=16, dtype="float16")   # 128 KiB blocks
    c = KVClient(d.socket, shared_memory=False)
    ns = c.namespace("drain", layout)
    keys = ns.block_keys(np.arange(16 * 160))
    kv = np.arange(len(keys), dtype=np.float16)[:, None].repeat(
        layout.block_bytes // 2, axis=1).reshape(len(keys), *layout.block_shape)
    for i in range(0, len(keys), 40):
        ns.put(keys[i:i + 40], kv[i:i + 40]).result()
    lease = ns.acquire(keys)
    assert len(lease) == len(keys)
    watch = c.watch_stats(0.05)
    next(watch)
    stream = c._stub.ReadBlocks(pb.ReadBlocksRequest(session_id=lease.session_id,
                                                     lease_id=lease.lease_id), timeout=30)
    got = [next(stream)]
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)                      # the daemon is draining while we read on
    got += list(stream)                  # the in-flight call finishes completely
    assert [m.index for m in got] == list(range(len(keys)))
    for m in got[::37]:
        want = np.full(layout.block_bytes // 2, m.index, dtype=np.float16).tobytes()
        assert m.data == want
    list(watch)                          # the watch stream ends cleanly: no error raised
    rc, _ = _wait_exit(d.proc, 10)
    assert rc == 0, d.log()
    assert "stopped" in d.log()
    assert not Path(d.socket).exists()
    assert not list(Path(d.shm_dir).glob("*.arena")), "arena file left behind"
    c.close()


def test_sigterm_exits_within_grace_despite_a_stuck_client(daemon_factory):
    d = daemon_factory("--dram-bytes", "128MiB", "--chunk-bytes", "16MiB",
                       "--shutdown-grace-s", "1")
    layout = KVLayout(4, 8, 128, block_tokens=16, dtype="float16")
    c = KVClient(d.socket, shared_memory=False)
    ns = c.namespace("stuck", layout)
    keys = ns.block_keys(np.arange(16 * 200))
    for i in range(0, len(keys), 50):
        ns.put(keys[i:i + 50], np.zeros((50, *layout.block_shape), np.float16)).result()
    lease = ns.acquire(keys)
    stream = c._stub.ReadBlocks(pb.ReadBlocksRequest(session_id=lease.session_id,
                                                     lease_id=lease.lease_id), timeout=60)
    next(stream)                         # ... and never read the other 199 blocks
    d.proc.send_signal(signal.SIGTERM)
    rc, took = _wait_exit(d.proc, 15)
    assert rc == 0, d.log()
    assert took < 1 + 4, f"shutdown took {took:.1f}s with a 1s grace period"
    stream.cancel()
    c.close()


def test_health_command(daemon, tmp_path):
    r = _cli("health", "--socket", daemon.socket)
    assert r.returncode == 0 and r.stdout.strip() == "SERVING", r.stderr
    r = _cli("health", "--socket", str(tmp_path / "nobody.sock"), "--timeout", "1")
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr


def test_ports_in_use_are_named(tmp_path):
    import socket as socketlib
    with socketlib.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        base = ["serve", "--socket", str(tmp_path / "kv.sock"), "--shm-dir", str(tmp_path),
                "--dram-bytes", "64MiB", "--chunk-bytes", "4MiB"]
        r = _cli(*base, "--metrics-port", str(port))
        assert r.returncode == 1 and f"metrics_port 127.0.0.1:{port}" in r.stderr, r.stderr
        r = _cli(*base, "--listen", f"127.0.0.1:{port}",
                 env={"KVSTORE_AUTH_TOKEN": "s3cret-s3cret-s3cret"})
        assert r.returncode == 1 and f"listen 127.0.0.1:{port}: cannot bind" in r.stderr, r.stderr
    assert not list(tmp_path.glob("*.arena")) and not (tmp_path / "kv.sock").exists()


def _bad_config_cases():
    cases = [
        ("ssd_file", lambda t: ["--ssd-bytes", "64MiB", "--ssd-dir", str(t / "afile")],
         ["ssd_dir", "is not a directory", "set --ssd-dir"]),
        ("ssd_under_file", lambda t: ["--ssd-bytes", "64MiB", "--ssd-dir", str(t / "afile" / "x")],
         ["ssd_dir", "is not a directory", "set --ssd-dir"]),
        # /sys refuses mkdir even to root (EPERM, or EROFS where it is mounted read-only).
        ("ssd_unwritable", lambda t: ["--ssd-bytes", "64MiB", "--ssd-dir", "/sys/kvstore-ssd-x"],
         ["ssd_dir", "not writable", "set --ssd-dir"]),
        ("shm_missing", lambda t: ["--shm-dir", str(t / "nope")],
         ["shm_dir", "does not exist", "set --shm-dir"]),
        ("socket_is_file", lambda t: ["--socket", str(t / "afile")],
         ["socket", "not a socket", "set --socket"]),
        ("dram_too_big", lambda t: ["--dram-bytes", "64TiB"],
         ["dram_bytes", "lower --dram-bytes"]),
    ]
    import torch
    if not torch.cuda.is_available():
        cases.append(("hbm_without_cuda", lambda t: ["--hbm-bytes", "64MiB"],
                      ["HBM tier", "CUDA is not available", "hbm_bytes = 0"]))
    return [pytest.param(args, words, id=name) for name, args, words in cases]


@pytest.mark.parametrize("args, words", _bad_config_cases())
def test_startup_configuration_failures_exit_2_and_say_what_to_change(tmp_path, args, words):
    (tmp_path / "afile").write_text("not a directory")
    shm = tmp_path / "shm"
    shm.mkdir()
    base = ["serve", "--socket", str(tmp_path / "kv.sock"), "--shm-dir", str(shm),
            "--dram-bytes", "64MiB", "--chunk-bytes", "4MiB"]
    r = _cli(*base, *args(tmp_path))
    assert r.returncode == 2, (r.returncode, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kvstore serve: configuration error: "), r.stderr
    for w in words:
        assert w in last, (w, last)
    assert "Errno" not in last and "Traceback" not in r.stderr
    # It never served, so it does not log a shutdown, and it leaves nothing behind.
    assert "draining" not in r.stderr and "stopped" not in r.stderr, r.stderr
    assert not list(shm.glob("*.arena")) and not (tmp_path / "kv.sock").exists()


def test_each_command_shows_only_its_own_flags_each_with_help():
    serve_only = ["--dram-bytes", "--ssd-bytes", "--hbm-device", "--metrics-port", "--listen",
                  "--tokens-file", "--shutdown-grace-s"]
    for cmd in ("stats", "health"):
        r = _cli(cmd, "--help")
        assert r.returncode == 0, r.stderr
        assert "--socket" in r.stdout and "--timeout" in r.stdout
        for flag in serve_only:
            assert flag not in r.stdout, (cmd, flag)
    r = _cli("serve", "--help")
    assert all(flag in r.stdout for flag in serve_only)
    assert "--json" not in r.stdout and "--watch" not in r.stdout
    # Every option of every command says what it does.
    from kvstore.daemon.cli import build_parser
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        if name in ("bench", "demo"):        # they parse their own arguments (and --help)
            continue
        for action in sub._actions:
            assert action.help, (name, action.option_strings or action.dest)
    assert all(a.help for a in parser._actions if a.option_strings)


def test_config_print_says_whose_configuration_it_shows(daemon):
    r = _cli("config", "--print", "--socket", str(Path(daemon.socket).parent / "none.sock"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# the configuration `kvstore serve` would start with here")
    assert "a running daemon keeps the one it started with" in r.stdout
    assert "a daemon is listening" not in r.stdout
    r = _cli("config", "--print", "--socket", daemon.socket)
    assert f"# a daemon is listening on {daemon.socket}" in r.stdout, r.stdout
    rows = [l for l in r.stdout.splitlines() if not l.startswith("#")]
    assert rows[0].startswith("socket") and daemon.socket in rows[0]


def test_stats_watch_into_head_ends_without_a_traceback(daemon):
    # `kvstore stats --watch ... | head -n 3`: head exits, the next snapshot meets a closed pipe.
    cmd = (f"set -o pipefail; {sys.executable} -m kvstore stats --socket {daemon.socket} "
           f"--watch 0.05 | head -n 3")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3 and r.stdout.startswith("kvstore ")
    assert r.stderr == "", r.stderr
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m kvstore stats "
                        f"--socket {daemon.socket} --json --watch 0.05 | head -c 10"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
