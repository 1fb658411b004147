"""deploy/: the Kubernetes manifests against the Kubernetes API models and, with
kubernetes-validate, the Kubernetes JSON schemas it ships (offline, strict), the systemd unit with
`systemd-analyze verify`, the Dockerfile's references, and every example config through
kvstore's own config loader."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from kvstore.daemon.config import load_config
from kvstore.core.units import parse_size

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
k8s = pytest.importorskip("kubernetes.client", reason="the kubernetes package (test extra)")

_SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str,
            "date": str}


def _check(value, type_name: str, path: str) -> None:
    """Every key known to the API model, every value of its declared type (strict: the
    client's own deserializer silently drops unknown keys, which hides typos)."""
    if type_name == "object":
        return
    # Type names are 'list[X]'/'dict(str, X)' or 'List[X]'/'Dict[str, X]' by client version.
    m = re.fullmatch(r"[lL]ist\[(.+)\]", type_name)
    if m:
        assert isinstance(value, list), f"{path}: expected a list"
        for i, v in enumerate(value):
            _check(v, m.group(1), f"{path}[{i}]")
        return
    m = re.fullmatch(r"[dD]ict[(\[]str, (.+)[)\]]", type_name)
    if m:
        assert isinstance(value, dict), f"{path}: expected a mapping"
        for k, v in value.items():
            _check(v, m.group(1), f"{path}.{k}")
        return
    if type_name in _SCALARS:
        ok = isinstance(value, _SCALARS[type_name]) and not (
            type_name in ("int", "float") and isinstance(value, bool))
        assert ok, f"{path}: expected {type_name}, got {value!r}"
        return
    model = getattr(k8s, type_name)
    assert isinstance(value, dict), f"{path}: expected a {type_name} mapping"
    by_json = {j: attr for attr, j in model.attribute_map.items()}
    for key, v in value.items():
        assert key in by_json, f"{path}.{key}: not a field of {type_name}"
        _check(v, model.openapi_types[by_json[key]], f"{path}.{key}")


class _Response:
    def __init__(self, doc):
        self.data = json.dumps(doc)


def _validate(doc: dict) -> None:
    group_version, kind = doc["apiVersion"], doc["kind"]
    name = "V1" + kind if group_version.split("/")[-1] == "v1" else None
    assert name and hasattr(k8s, name), f"no API model for {group_version} {kind}"
    _check({k: v for k, v in doc.items()}, name, kind)
    # The client's own models enforce required fields (and, being pydantic in recent client
    # versions, value types): they raise ValueError subclasses.
    model = getattr(k8s, name)
    if hasattr(model, "from_dict"):
        model.from_dict(doc)
    else:
        k8s.ApiClient().deserialize(_Response(doc), name)


def _docs():
    out = []
    for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def test_manifests_match_the_kubernetes_api():
    docs = _docs()
    assert {d["kind"] for d in docs} >= {"Deployment", "ConfigMap", "Secret"}
    for d in docs:
        _validate(d)


def test_the_validator_catches_mistakes():
    dep = next(d for d in _docs() if d["kind"] == "Deployment")
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(AssertionError, match="volumeMount: not a field of V1Container"):
        _validate(bad)
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["initContainers"][0]["startupProbe"]["grpc"]["port"] = "x"
    with pytest.raises(AssertionError, match="expected int"):
        _validate(bad)
    bad = json.loads(json.dumps(dep))
    del bad["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        _validate(bad)


# The sidecar is a native sidecar (an init container with restartPolicy: Always): Kubernetes
# 1.29 is the oldest release the manifests are written for.
_OLDEST_K8S = "1.29.0"


def _schema_errors(doc: dict, version: str) -> list[str]:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra)")
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        return [f"{doc['kind']} {doc['metadata']['name']}: {'.'.join(map(str, e.path))}: "
                f"{e.message}"]
    return []


def test_manifests_match_the_kubernetes_schemas():
    """Every document of deploy/kubernetes/ (the sidecar's and the Mooncake master's) against
    the strict JSON schemas (unknown fields are errors) of the oldest Kubernetes they need and
    of the newest kubernetes-validate knows."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra)")
    docs = _docs()
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} >= {
        ("Deployment", "llm-inference"), ("ConfigMap", "kvstore-config"),
        ("Secret", "kvstore-tokens"), ("Deployment", "mooncake-master"),
        ("Service", "mooncake-master")}
    for version in (_OLDEST_K8S, kv.latest_version()):
        errors = [e for d in docs for e in _schema_errors(d, version)]
        assert not errors, f"Kubernetes {version}:\n" + "\n".join(errors)


def test_the_schema_check_catches_mistakes():
    dep = next(d for d in _docs() if d["metadata"]["name"] == "mooncake-master")
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["tcpSocket"]["prot"] = 1
    assert any("prot" in e for e in _schema_errors(bad, _OLDEST_K8S))
    bad = json.loads(json.dumps(dep))
    bad["spec"]["replicas"] = "1"
    assert _schema_errors(bad, _OLDEST_K8S)
    # Before 1.28 an init container had no restartPolicy: the sidecar needs a newer cluster.
    sidecar = next(d for d in _docs() if d["kind"] == "Deployment" and
                   d["metadata"]["name"] == "llm-inference")
    assert any("restartPolicy" in e for e in _schema_errors(sidecar, "1.27.0"))


def test_sidecar_pod_wiring():
    docs = _docs()
    dep = next(d for d in docs if d["kind"] == "Deployment")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    pod = dep["spec"]["template"]["spec"]
    (kv,) = [c for c in pod["initContainers"] if c["name"] == "kvstore"]
    assert kv["restartPolicy"] == "Always"                       # a native sidecar
    (engine,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    toml_text = cm["data"]["kvstore.toml"]
    cfg = load_config(overrides={}, env={}, config_file=_write_tmp(toml_text))

    def mounts(c):
        return {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    # Shared /dev/shm in memory, big enough for the arena, in both containers.
    for c in (kv, engine):
        assert volumes[mounts(c)["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    shm = volumes[mounts(kv)["/dev/shm"]]["emptyDir"]
    assert parse_size(shm["sizeLimit"].replace("Gi", "GiB")) > cfg.dram_bytes
    # The socket's directory is one volume mounted in both containers.
    sock_dir = str(Path(cfg.socket).parent)
    assert mounts(kv)[sock_dir] == mounts(engine)[sock_dir]
    assert "emptyDir" in volumes[mounts(kv)[sock_dir]]
    assert {"name": "KVSTORE_SOCKET", "value": cfg.socket} in engine["env"]
    # gRPC health probes on the port kvstore listens on.
    port = int(cfg.listen.rsplit(":", 1)[1])
    assert any(p["containerPort"] == port for p in kv["ports"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert kv[probe]["grpc"]["port"] == port, probe
    # Limits on both; the SSD tier on a hostPath or a PVC.
    for c in (kv, engine):
        assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]
    # The SSD tier is on, in a hostPath or PVC volume mounted where the config puts it.
    assert cfg.ssd_bytes > 0, "the SSD volume is mounted but the SSD tier is off"
    ssd = volumes[mounts(kv)[cfg.ssd_dir]]
    assert "hostPath" in ssd or "persistentVolumeClaim" in ssd, ssd
    # Prometheus scrapes the metrics port.
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == cfg.metrics_port and cfg.metrics_host == "0.0.0.0"


def test_mooncake_master_service_reaches_its_pod():
    """The cluster tier's master: the Service selects the Deployment's pods, and its port is the
    one the master listens on and the one the sidecar's example remote URL names."""
    docs = _docs()
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] ==
               "mooncake-master")
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] ==
               "mooncake-master")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    rpc_port = int(next(a for a in c["args"] if a.startswith("--rpc_port=")).split("=")[1])
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    (rpc,) = [p for p in svc["spec"]["ports"] if p["name"] == "rpc"]
    assert named[rpc["targetPort"]] == rpc_port == rpc["port"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    line = next(l for l in cm["data"]["kvstore.toml"].splitlines() if "remote = " in l)
    url = line.split("=", 1)[1].strip().strip('"')
    cfg = load_config(overrides={"remote": url}, env={})
    assert cfg.remote == f"mooncake://{svc['metadata']['name']}:{rpc['port']}"


def _write_tmp(text: str) -> Path:
    import tempfile
    f = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    f.write(text)
    f.close()
    return Path(f.name)


@pytest.mark.parametrize("name", sorted(p.name for p in (DEPLOY / "config").glob("*.toml")))
def test_example_configs_load(name):
    cfg = load_config(DEPLOY / "config" / name, env={}, overrides={})
    assert all(src == str(DEPLOY / "config" / name) or src == "default"
               for _, _, src in cfg.describe())


def test_dockerfile_references_exist():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert "FROM ${CPU_BASE} AS base-cpu" in text and "FROM ${CUDA_BASE} AS base-cuda" in text
    assert "FROM base-${VARIANT}" in text
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"COPY {path}: missing from the repository"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    named = [e for group in re.findall(r'KVSTORE_EXTRAS="\[([\w,]+)\]"', text)
             for e in group.split(",")]
    assert {"gds", "hbm"} <= set(named)            # the CUDA image: GDS and the HBM tier
    for extra in named:
        assert extra in extras, f"extra [{extra}] not in pyproject"
    assert 'ENTRYPOINT ["kvstore"]' in text and '"kvstore", "health"' in text


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("systemd-analyze missing and apt-get unavailable (not root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "systemd"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if r.returncode:
            pytest.skip(f"cannot install systemd: {r.stderr.strip()[-300:]}")
    return shutil.which("systemd-analyze") or pytest.skip("systemd-analyze still missing")


def test_systemd_unit_verifies(tmp_path):
    exe = _systemd_analyze()
    unit = (DEPLOY / "systemd" / "kvstore.service").read_text()
    # verify checks that ExecStart exists: point it at this environment's kvstore.
    kvstore_bin = Path(sys.executable).parent / "kvstore"
    assert kvstore_bin.exists()
    unit = unit.replace("/opt/kvstore/bin/kvstore", str(kvstore_bin))

    def verify(text: str, where: Path) -> tuple[int, list[str]]:
        where.mkdir()
        (where / "kvstore.service").write_text(text)
        r = subprocess.run([exe, "verify", "--man=no", str(where / "kvstore.service")],
                           capture_output=True, text=True, timeout=60)
        # verify exits 0 on unknown keys; its warnings name the unit file, so count those too.
        return r.returncode, [l for l in (r.stdout + r.stderr).splitlines()
                              if "kvstore.service" in l]
    rc, problems = verify(unit, tmp_path / "good")
    assert rc == 0 and not problems, problems
    _, problems = verify(unit.replace("KillSignal=", "KilSignal="), tmp_path / "typo")
    assert any("KilSignal" in p for p in problems), "the check would miss a typo"
