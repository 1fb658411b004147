"""A real vLLM engine in a child process, driven over stdin/stdout (tests and `bench vllm`).

vLLM is large and pins its own torch, so it lives in its own environment; the kvstore test
suite and CLI run elsewhere and start the engine with that environment's interpreter:

    py = find_vllm_python()                       # or None: vLLM not installed anywhere known
    make_model(py, "/tmp/m", "tiny")              # random-weight Llama via save_pretrained
    with EngineProcess(py, "/tmp/m", socket=sock) as eng:   # socket=None: no connector
        r = eng.generate([[1, 2, 3, ...]], max_tokens=8)
        r["outputs"], r["num_cached_tokens"], eng.stats()

The child runs ``python -m kvstore.bench.vllm_engine serve ...``: one JSON command per stdin
line, one JSON reply per stdout line prefixed with ``REPLY_PREFIX`` (vLLM logs to stdout too).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

VLLM_VERSION = "0.32.0"
REPLY_PREFIX = "@@kvstore-engine@@ "
REPO = Path(__file__).resolve().parents[2]

# name -> (hidden, layers, heads, kv heads, intermediate, vocab)
MODEL_SHAPES = {
    "tiny": (256, 4, 4, 2, 512, 2048),
    "small": (1024, 8, 16, 8, 2816, 32000),
    "1b": (2048, 16, 32, 8, 8192, 128256),   # the Llama-3.2-1B shape
}


def find_vllm_python() -> str | None:
    """The interpreter of an environment with vLLM and kvstore, or None.

    Looked for in order: $KVSTORE_VLLM_PYTHON, this interpreter, <repo>/.venv-vllm, the CI
    cache ~/.cache/kvstore-ci/vllm-<version>.
    """
    candidates = [os.environ.get("KVSTORE_VLLM_PYTHON"), sys.executable,
                  str(REPO / ".venv-vllm" / "bin" / "python"),
                  str(Path.home() / ".cache" / "kvstore-ci" / f"vllm-{VLLM_VERSION}" / "bin" / "python")]
    for py in candidates:
        if py and os.path.exists(py) and _has_vllm(py):
            return py
    return None


def _has_vllm(py: str) -> bool:
    if py == sys.executable:
        import importlib.util
        return importlib.util.find_spec("vllm") is not None
    r = subprocess.run([py, "-c", "import importlib.util as u, sys; "
                        "sys.exit(0 if u.find_spec('vllm') and u.find_spec('kvstore.client') else 1)"],
                       capture_output=True, timeout=60)
    return r.returncode == 0


def kvstore_origin(py: str) -> Path:
    """Where the interpreter ``py`` imports kvstore from (its package directory), as vLLM's
    spawned workers see it: run outside any checkout, so a ``kvstore/`` in the current
    directory does not shadow what is installed."""
    r = subprocess.run([py, "-c", "import kvstore, os; print(os.path.dirname(kvstore.__file__))"],
                       capture_output=True, text=True, timeout=60, check=True, cwd="/")
    return Path(r.stdout.strip()).resolve()


def make_model(py: str, out_dir: str, shape: str = "tiny", seed: int = 0) -> None:
    """Save a random-weight Llama of ``shape`` to ``out_dir`` (in the vLLM environment)."""
    subprocess.run([py, "-m", "kvstore.bench.vllm_engine", "make-model", out_dir,
                    "--shape", shape, "--seed", str(seed)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, timeout=900)


class EngineProcess:
    """A vLLM ``LLM`` in a child process; ``socket=None`` runs it without the connector.

    ``peer_transfer`` runs it with another connector instead (a peer cache in a benchmark):
    the keyword arguments of vLLM's ``KVTransferConfig``, e.g. ``{"kv_connector":
    "LMCacheMPConnector", "kv_role": "kv_both", "kv_connector_extra_config": {...}}``;
    ``socket`` must then be None. ``env`` is added to the child's environment.
    """

    def __init__(self, py: str, model_dir: str, socket: str | None = None, *,
                 max_model_len: int = 1024, extra_config: dict | None = None,
                 prefix_caching: bool = False, log_path: str | None = None,
                 start_timeout_s: float = 600.0, kv_role: str = "kv_both",
                 peer_transfer: dict | None = None, env: dict | None = None):
        if peer_transfer is not None and socket is not None:
            raise ValueError("EngineProcess: give socket (kvstore) or peer_transfer, not both")
        args = [py, "-m", "kvstore.bench.vllm_engine", "serve", model_dir,
                "--max-model-len", str(max_model_len)]
        if prefix_caching:
            args.append("--prefix-caching")
        if socket is not None:
            args += ["--kv-config", json.dumps({"socket": socket, **(extra_config or {})}),
                     "--kv-role", kv_role]
        if peer_transfer is not None:
            args += ["--peer-transfer", json.dumps(peer_transfer)]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", **(env or {}))
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, cwd=REPO, env=env)
        self.log_path = log_path
        self.ready = self._reply(start_timeout_s)

    def _reply(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"vLLM engine exited ({self.proc.wait()}); log: {self.log_path}")
            if line.startswith(REPLY_PREFIX):
                reply = json.loads(line[len(REPLY_PREFIX):])
                if "error" in reply:
                    raise RuntimeError(f"vLLM engine: {reply['error']}")
                return reply
            if self._log is not subprocess.DEVNULL:
                self._log.write(line)  # vLLM's own log lines
        raise TimeoutError(f"vLLM engine gave no reply in {timeout_s}s; log: {self.log_path}")

    def call(self, op: str, timeout_s: float = 600.0, **kw) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout_s)

    def generate(self, prompts: list[list[int]], max_tokens: int = 8) -> dict:
        return self.call("generate", prompts=prompts, max_tokens=max_tokens)

    def stats(self) -> dict:
        return self.call("stats")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit", timeout_s=60)
                self.proc.wait(60)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Child side (runs under the vLLM environment's interpreter)
# ---------------------------------------------------------------------------------------------
def _make_model(out_dir: str, shape: str, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv_heads, inter, vocab = MODEL_SHAPES[shape]
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=8192, tie_word_embeddings=True,
                      # wide weights: greedy picks are far apart, so equal KV gives equal tokens
                      initializer_range=0.2 if shape == "tiny" else 0.02,
                      torch_dtype="bfloat16")
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out_dir)


def _send(obj: dict) -> None:
    sys.stdout.write(REPLY_PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _connector_counters(llm) -> dict:
    out = {}
    try:
        out["scheduler"] = dict(llm.llm_engine.engine_core.engine_core.scheduler.connector.counters.total)
    except AttributeError:
        pass
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group
        out["worker"] = dict(get_kv_transfer_group().counters.total)
    except (AttributeError, AssertionError):
        pass
    return out


def _drain(llm, timeout_s: float = 60.0) -> None:
    """Step the engine while finished requests wait on the connector (a kv_producer holds
    them until their blocks reach the cluster tier). This in-process engine steps only inside
    generate(); a multiprocess engine core keeps stepping while it has such requests, and so
    does this, bounded."""
    try:
        core = llm.llm_engine.engine_core.engine_core
        sched = core.scheduler
    except AttributeError:
        return
    deadline = time.monotonic() + timeout_s
    while sched.has_finished_requests() and time.monotonic() < deadline:
        core.step_fn()
        time.sleep(0.005)


def _tolerate_non_dict_vars() -> None:
    """Let vLLM's triton kernel dispatcher scan modules holding numba objects.

    On vLLM-CPU, importing LMCache's connector loads numba, whose objects have a ``__dict__``
    attribute that is not a dict (``vars()`` returns it, and the dispatcher's ``.get`` on it
    raises); the dispatcher's module scan calls ``vars(x).get("kernel")`` on every module
    attribute. Such an object holds no triton kernel, so an empty namespace is the right answer
    for it. The name is shadowed in that module only.
    """
    import builtins
    from collections.abc import Mapping

    from vllm.triton_utils import dispatcher

    def tolerant_vars(obj):
        try:
            ns = builtins.vars(obj)
        except TypeError:
            return {}
        return ns if isinstance(ns, Mapping) else {}

    dispatcher.vars = tolerant_vars


def _serve(model_dir: str, max_model_len: int, kv_config: str | None,
           prefix_caching: bool, kv_role: str = "kv_both",
           peer_transfer: str | None = None) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = {}
    if kv_config:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.client.vllm",
            kv_role=kv_role, kv_connector_extra_config=json.loads(kv_config))
    elif peer_transfer:
        cfg = json.loads(peer_transfer)
        if cfg.get("kv_connector") == "LMCacheMPConnector":
            _tolerate_non_dict_vars()
        kw["kv_transfer_config"] = KVTransferConfig(**cfg)
    try:
        # vLLM's own prefix cache is off by default here, so reuse is the connector's alone.
        llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=max_model_len, enforce_eager=True,
                  enable_prefix_caching=prefix_caching,
                  seed=0, **kw)
    except Exception as exc:  # noqa: BLE001
        _send({"error": f"{type(exc).__name__}: {exc}"})
        raise
    _send({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            _send({"bye": True})
            return
        if op == "stats":
            _send(_connector_counters(llm))
        elif op == "generate":
            params = SamplingParams(max_tokens=cmd.get("max_tokens", 8), temperature=0.0,
                                    ignore_eos=True, detokenize=False)
            prompts = [TokensPrompt(prompt_token_ids=p) for p in cmd["prompts"]]
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            _drain(llm)
            _send({"outputs": [list(o.outputs[0].token_ids) for o in outs],
                   "num_cached_tokens": [o.num_cached_tokens for o in outs],
                   "elapsed_s": elapsed})
        else:
            _send({"error": f"unknown op {op!r}"})


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kvstore.bench.vllm_engine", allow_abbrev=False)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-model")
    p.add_argument("out_dir")
    p.add_argument("--shape", choices=sorted(MODEL_SHAPES), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("serve")
    p.add_argument("model_dir")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-config", help="JSON kv_connector_extra_config; absent: no connector")
    p.add_argument("--prefix-caching", action="store_true", help="vLLM's own prefix cache on")
    p.add_argument("--kv-role", default="kv_both",
                   choices=["kv_both", "kv_producer", "kv_consumer"])
    p.add_argument("--peer-transfer", help="JSON KVTransferConfig kwargs of another connector")
    args = ap.parse_args(argv)
    if args.cmd == "make-model":
        _make_model(args.out_dir, args.shape, args.seed)
    else:
        _serve(args.model_dir, args.max_model_len, args.kv_config, args.prefix_caching,
               args.kv_role, args.peer_transfer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
