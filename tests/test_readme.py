"""The README's examples run as written, against a real daemon."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from support import REPO


def _python_block(section: str) -> str:
    """The first ```python block under the README heading `section`."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", body, re.S)
    assert m, f"no python block under '## {section}'"
    return m.group(1)


def test_sdk_example_runs_as_written(daemon_factory, tmp_path):
    d = daemon_factory("--dram-bytes", "256MiB", "--chunk-bytes", "32MiB")
    # The example uses KVClient() with no arguments: the default socket under XDG_RUNTIME_DIR,
    # which here leads to the test's daemon.
    runtime = tmp_path / "runtime"
    (runtime / "kvstore").mkdir(parents=True)
    os.symlink(d.socket, runtime / "kvstore" / "kvstore.sock")
    script = tmp_path / "example.py"
    script.write_text(_python_block("Use the SDK"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
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
