"""The README's examples run as written, against a real daemon, and its commands are the ones
CI and the package really have."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from support import REPO

README = (REPO / "README.md").read_text()


def _section(section: str) -> str:
    return README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]


def _block(section: str, lang: str) -> str:
    """The first ```lang block under the README heading `section`."""
    m = re.search(rf"```{lang}\n(.*?)```", _section(section), re.S)
    assert m, f"no {lang} block under '## {section}'"
    return m.group(1)


def _python_block(section: str) -> str:
    return _block(section, "python")


def _run_example(daemon_factory, tmp_path, code: str, env_extra: dict | None = None):
    """Run `code` as a script whose KVClient() finds a test daemon on the default socket."""
    d = daemon_factory("--dram-bytes", "256MiB", "--chunk-bytes", "32MiB")
    # The examples use KVClient() with no arguments: the default socket under XDG_RUNTIME_DIR,
    # which here leads to the test's daemon.
    runtime = tmp_path / "runtime"
    (runtime / "kvstore").mkdir(parents=True)
    os.symlink(d.socket, runtime / "kvstore" / "kvstore.sock")
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, env={**env, "XDG_RUNTIME_DIR": str(runtime)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "6 blocks stored"
    assert lines[1] == "6 blocks read back, equal: True"
    # print(client.stats()): the short table, with the 6 blocks in the DRAM row.
    table = lines[2:]
    assert table[0].startswith("kvstore ") and "hit rate" in table[1]
    assert re.search(r"^\s*DRAM\s.*\s6\s", table[2]), table
    assert len(table) <= 8, r.stdout


@pytest.mark.parametrize("torch", ["with torch", "without torch"])
def test_sdk_example_runs_as_written(daemon_factory, tmp_path, torch):
    """Run it installs no torch: the example must run on numpy alone (torch made unimportable
    here), and the same with torch installed (then get returns tensors)."""
    code, env = _python_block("Use the SDK"), {}
    if torch == "without torch":
        blocker = tmp_path / "no-torch" / "torch"
        blocker.mkdir(parents=True)
        (blocker / "__init__.py").write_text("raise ImportError('torch is not installed')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])
        code += "\nimport sys; assert 'torch' not in sys.modules\n"
    _run_example(daemon_factory, tmp_path, code, env)


def test_sdk_page_torch_example_runs_as_written(daemon_factory, tmp_path):
    """docs/sdk.md opens with the same example on bfloat16 torch tensors."""
    page = (REPO / "docs" / "sdk.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    assert "import torch" in code
    _run_example(daemon_factory, tmp_path, code)


def _commands(section: str) -> list[str]:
    return [line for line in _block(section, "bash").splitlines() if line.strip()]


def test_test_command_is_what_ci_runs():
    ci_last = [line for line in (REPO / ".ci/run").read_text().splitlines() if line.strip()][-1]
    assert _commands("Test it") == [ci_last]


def test_run_it_installs_no_torch():
    """The daemon and the SDK example need no torch: Run it installs the package without extras,
    and the package's own dependencies include no torch."""
    (cmd,) = _commands("Run it")
    assert cmd == "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/kvstore serve"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if re.match(r"(torch|triton|nvidia)", d)], deps


def test_commands_parse():
    """Every bash block in the README is valid shell, and every `kvstore serve` line in it
    takes only flags the daemon knows (checked with `kvstore config --print`, which takes the
    same configuration flags and starts nothing)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        r = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert r.returncode == 0, f"{block!r}: {r.stderr}"
    serve_lines = re.findall(r"kvstore serve((?: --?[\w-]+(?: [^\s`&|;)]+)?)*)", README)
    assert serve_lines
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    for flags in serve_lines:
        r = subprocess.run([sys.executable, "-m", "kvstore", "config", "--print",
                            *shlex.split(flags)], capture_output=True, text=True, timeout=60,
                           env=env)
        assert r.returncode == 0, f"kvstore serve{flags}: {r.stderr}"


def test_engine_configs_name_real_code():
    """The vLLM and SGLang lines' JSON parses and names the module, class and role the
    adapters really have (without importing vLLM or SGLang)."""
    section = _section("Use it from an engine")
    vllm = json.loads(re.search(r"--kv-transfer-config '([^']+)'", section).group(1))
    assert vllm["kv_connector_module_path"] == "kvstore.client.vllm"
    assert f"class {vllm['kv_connector']}" in (REPO / "client/vllm/connector.py").read_text()
    assert vllm["kv_role"] in ("kv_both", "kv_producer", "kv_consumer")
    sgl = json.loads(re.search(r"--hicache-storage-backend-extra-config '([^']+)'",
                               section).group(1))
    assert sgl["module_path"] == "kvstore.client.sglang"
    assert f"class {sgl['class_name']}" in (REPO / "client/sglang.py").read_text()
