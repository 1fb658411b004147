"""The command line as an operator meets it: help where a command is missing, the subcommand's
usage and a "did you mean" for a wrong option, no prefix abbreviations, one clear line when the
daemon is not there, auto defaults shown as auto, benchmarks described in words, no files
written unasked. Each runs `kvstore` as a subprocess and checks its exit code and output."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.bench import BENCHMARKS

ROOT = Path(__file__).resolve().parents[2]


def _kvstore(*args: str, env: dict | None = None, cwd: Path | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
    # Without the caller's KVSTORE_* variables: the test decides the configuration.
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True,
                          text=True, timeout=timeout, env={**base, **(env or {})}, cwd=cwd)


def test_bare_kvstore_prints_its_help_and_exits_2():
    r = _kvstore()
    assert r.returncode == 2
    assert r.stderr.startswith("usage: kvstore")
    assert all(c in r.stderr for c in ("serve", "stats", "config", "bench", "demo"))
    assert "the following arguments are required" not in r.stderr


def test_unknown_command_suggests_the_nearest():
    r = _kvstore("serv")
    assert r.returncode == 2 and "unknown command 'serv' (did you mean serve?)" in r.stderr


def test_unknown_option_gets_the_subcommands_usage_and_a_suggestion(tmp_path):
    r = _kvstore("serve", "--bogus")
    assert r.returncode == 2
    assert "usage: kvstore serve" in r.stderr
    assert "kvstore serve: error: unrecognized arguments: --bogus" in r.stderr
    r = _kvstore("stats", "--jsn")
    assert r.returncode == 2 and "usage: kvstore stats" in r.stderr
    assert "unrecognized arguments: --jsn (did you mean --json?)" in r.stderr


def test_prefix_abbreviations_are_refused(tmp_path):
    # argparse would take --dram-byte for --dram-bytes and start a daemon: refused before that.
    r = _kvstore("serve", "--dram-byte", "64MiB", "--socket", str(tmp_path / "kv.sock"))
    assert r.returncode == 2
    assert "unrecognized arguments: --dram-byte 64MiB (did you mean --dram-bytes?)" in r.stderr
    assert not (tmp_path / "kv.sock").exists()
    r = _kvstore("config", "--chunk-byte", "32MiB")
    assert r.returncode == 2 and "did you mean --chunk-bytes?" in r.stderr
    r = _kvstore("bench", "dram", "--repeat", "1")      # a benchmark's own parser too
    assert r.returncode == 2 and "unrecognized arguments: --repeat" in r.stderr


def test_every_argument_parser_refuses_abbreviations():
    # New parsers included: a bench or tool that forgets allow_abbrev=False fails here.
    missing = []
    for folder in ("kvstore", "client", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "ArgumentParser"):
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(kw.get("allow_abbrev"), ast.Constant)
                            and kw["allow_abbrev"].value is False):
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert missing == []


def test_bench_help_describes_each_benchmark_in_words():
    r = _kvstore("bench", "--help")
    assert r.returncode == 0, r.stderr
    assert "kvstore.bench." not in r.stdout                  # no module paths
    lines = {line.split()[0]: line for line in r.stdout.splitlines()
             if line.startswith("  ") and line.split()[0] in BENCHMARKS}
    assert set(lines) == set(BENCHMARKS)
    for name, line in lines.items():
        assert len(line.split()) >= 5, line                  # a phrase, not a name
    assert "SDK against memcpy" in lines["dram"] and "O_DIRECT" in lines["ssd"]
    r = _kvstore("bench")
    assert r.returncode == 2 and "benchmarks:" in r.stdout
    r = _kvstore("bench", "ssdd")
    assert r.returncode == 2 and "unknown benchmark 'ssdd' (did you mean ssd?)" in r.stderr


def test_dram_too_big_says_it_once(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    r = _kvstore("serve", "--socket", str(tmp_path / "kv.sock"), "--shm-dir", str(shm),
                 "--dram-bytes", "64TiB")
    assert r.returncode == 2, r.stderr
    err = r.stderr
    assert err.count("cannot reserve") == 1 and err.count("--dram-bytes") == 1, err
    assert "dram_bytes: cannot reserve 64.0 TiB" in err and "free there" in err
    assert not list(shm.iterdir())


def test_unreachable_daemon_asks_whether_it_runs(tmp_path):
    sock = tmp_path / "nobody.sock"
    want = f"is the daemon running? (socket {sock}: no such file)"
    r = _kvstore("stats", "--socket", str(sock), "--timeout", "1")
    assert r.returncode == 1 and f"kvstore stats: cannot reach the daemon: {want}" in r.stderr
    assert "failed to connect" not in r.stderr and "UNAVAILABLE" not in r.stderr
    r = _kvstore("health", "--socket", str(sock), "--timeout", "1")
    assert r.returncode == 1
    assert f"kvstore health: cannot reach the daemon: {want} [UNAVAILABLE]" in r.stderr
    assert "failed to connect" not in r.stderr
    from kvstore.client import KVClient, KVStoreError
    with pytest.raises(KVStoreError) as e:        # the SDK's own message, the same words
        KVClient(str(sock), timeout_s=1)
    assert str(e.value) == f"cannot reach the daemon: {want}"


def test_config_print_shows_auto_defaults_as_auto():
    r = _kvstore("config", "--print")
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("dram_bytes ")]
    assert "auto: a quarter of the memory available when the daemon starts" in line
    assert ", now " in line and ("GiB" in line or "MiB" in line)
    r = _kvstore("config", "--print", env={"KVSTORE_DRAM_BYTES": "1GiB"})
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("dram_bytes ")]
    assert "1.0 GiB" in line and "($KVSTORE_DRAM_BYTES)" in line and "auto" not in line


def test_stats_shows_what_the_running_daemon_holds(daemon_factory):
    d = daemon_factory("--dram-bytes", "72MiB", "--chunk-bytes", "8MiB")
    r = _kvstore("stats", "--socket", d.socket)
    assert r.returncode == 0, r.stderr
    (dram,) = [ln for ln in r.stdout.splitlines() if ln.split()[:1] == ["DRAM"]]
    assert "72.0 MiB" in dram
    r = _kvstore("config", "--print", "--socket", d.socket)
    assert f"a daemon is listening on {d.socket}: `kvstore stats` shows what it holds" in r.stdout


@pytest.mark.slow     # a model in a subprocess: about a minute on a shared 2-core machine
def test_demo_first_turn_shows_no_speedup(daemon_factory):
    pytest.importorskip("transformers")
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "4MiB")
    r = _kvstore("demo", "--socket", d.socket, "--model", "tiny", "--turns", "2",
                 "--doc-tokens", "80", "--question-tokens", "8", "--answer-tokens", "2",
                 timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.split()[:1] in (["1"], ["2"])]
    assert [row[0] for row in rows] == ["1", "2"]
    first, second = rows
    assert first[2] == "0" and "-" in first and not any(c.endswith("x") for c in first)
    assert int(second[2]) > 0 and any(c.endswith("x") for c in second)


@pytest.mark.slow
def test_bench_recompute_writes_no_file_unasked(tmp_path):
    pytest.importorskip("transformers")
    r = _kvstore("bench", "recompute", "--shape", "tiny", "--prefix-tokens", "256",
                 "--chunk-tokens", "64", "--factors", "4", "--json", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"plot"' not in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_event_loop_is_chosen_checked_and_named(daemon_factory, tmp_path, shm_dir):
    """uvloop where installed (auto, the default), asyncio on request; a daemon told to use
    uvloop where it is missing refuses to start with one line; each serves puts and gets."""
    import numpy as np

    from kvstore.client import KVClient, KVLayout
    layout = KVLayout(1, 1, 64, 16, "uint8")
    for flag, want in (((), "uvloop"), (("--event-loop", "asyncio"), "asyncio")):
        d = daemon_factory("--dram-bytes", "16MiB", "--chunk-bytes", "1MiB", *flag)
        assert f"; {want} event loop" in d.log()
        with KVClient(d.socket) as c:
            ns = c.namespace("m", layout)
            keys = ns.block_keys(list(range(32)))
            data = np.arange(2 * layout.block_bytes, dtype=np.uint64).astype(np.uint8)
            assert ns.put(keys, data.reshape(2, *layout.block_shape)).result() == 2
            assert np.array_equal(np.asarray(ns.get(keys).result()).reshape(-1), data)
    r = _kvstore("serve", "--event-loop", "libuv", "--socket", str(tmp_path / "a.sock"))
    assert r.returncode == 2
    assert "event_loop" in r.stderr and "must be one of auto, uvloop, asyncio" in r.stderr
    # an interpreter where uvloop does not import
    fake = tmp_path / "no-uvloop"
    (fake / "uvloop").mkdir(parents=True)
    (fake / "uvloop" / "__init__.py").write_text("raise ImportError('not here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake), *sys.path])}
    r = _kvstore("serve", "--event-loop", "uvloop", "--socket", str(tmp_path / "b.sock"),
                 "--dram-bytes", "16MiB", "--chunk-bytes", "1MiB", "--shm-dir", str(shm_dir),
                 env=env)
    assert r.returncode == 2
    assert "event_loop = uvloop, but uvloop is not installed" in r.stderr
    assert not (tmp_path / "b.sock").exists()
    d = daemon_factory("--dram-bytes", "16MiB", "--chunk-bytes", "1MiB", env=env)
    assert "; asyncio event loop" in d.log()                  # auto: asyncio without uvloop
