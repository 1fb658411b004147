"""The distribution builds, and what it installs runs outside this checkout.

`python -m build` makes the sdist and then the wheel from the unpacked sdist (in build
isolation, as a release would), so a wheel proves the sdist builds too; the wheel goes into a
fresh venv of its own, without this checkout on the path; its `kvstore`
command answers --help, serves on a socket and passes its own health check, and
`kvstore.client` imports. The runtime dependencies come from the test's environment through a
.pth file (the wheel is installed with --no-deps): the test checks the package, not PyPI.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import grpc
import pytest

from support import REPO

pytestmark = pytest.mark.slow

DIST = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], timeout=600)
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return wheels[0], sdists[0]


def test_distribution_name_is_not_the_unrelated_pypi_kvstore():
    # "kvstore" on PyPI is another project (a K/V store client, 2016): installing it by that
    # name would fetch the wrong thing. The import name and the command stay kvstore.
    assert DIST == "kvstore-offload"


def test_sdist_has_the_contract_the_licence_and_the_readme(dists):
    _, sdist = dists
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("LICENSE", "README.md", "pyproject.toml", "proto/kvstore/v1/kvstore.proto",
                   "proto/generate.py", "kvstore/v1/kvstore_pb2.py", "client/sdk.py"):
        assert needed in names, f"{needed} missing from {sdist.name}"


def test_wheel_installs_and_runs_in_a_fresh_venv(dists, tmp_path):
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "kvstore/client/sdk.py" in names and "kvstore/kernels/reference.py" in names
    assert any(n.startswith("kvstore/metrics/web/") and n.endswith(".html") for n in names)
    assert any(n.startswith("kvstore/v1/") and n.endswith(".pyi") for n in names)
    assert any(n.endswith("licenses/LICENSE") for n in names), "LICENSE not in the wheel"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py, kvstore = venv / "bin" / "python", venv / "bin" / "kvstore"
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)])
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
                .stdout.strip())
    # grpcio, protobuf, numpy, prometheus-client, xxhash: where this environment has them.
    (site / "_test_deps.pth").write_text(str(Path(grpc.__file__).parents[1]) + "\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVSTORE_", "PYTHON"))}
    cwd = tmp_path / "elsewhere"                        # not the checkout: no source on sys.path
    cwd.mkdir()
    run = lambda *cmd, **kw: _run([*cmd], env=env, cwd=cwd, **kw)  # noqa: E731

    assert "serve" in run(str(kvstore), "--help").stdout
    where = run(str(py), "-c", "import kvstore, kvstore.client, kvstore.kernels; "
                "from kvstore.client import KVClient, KVLayout; print(kvstore.__file__)").stdout
    assert where.strip().startswith(str(site)), where
    version = run(str(py), "-c", f"import importlib.metadata as m; print(m.version({DIST!r}))")
    assert version.stdout.strip() == tomllib.loads(
        (REPO / "pyproject.toml").read_text())["project"]["version"]

    # The installed command serves: a daemon on a socket of its own, its health check SERVING.
    sock, shm = tmp_path / "kv.sock", tmp_path / "shm"
    shm.mkdir()
    daemon = subprocess.Popen([str(kvstore), "serve", "--socket", str(sock), "--shm-dir", str(shm),
                               "--dram-bytes", "64MiB", "--chunk-bytes", "16MiB"],
                              env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run([str(kvstore), "health", "--socket", str(sock)], env=env, cwd=cwd,
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
            assert daemon.poll() is None, daemon.communicate()[0]
            assert time.monotonic() < deadline, r.stderr
            time.sleep(0.2)
    finally:
        daemon.terminate()
        out, _ = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, out
