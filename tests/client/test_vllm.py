"""The vLLM connector end to end: a real vLLM (CPU build) in child processes, a real daemon.

vLLM lives in its own environment (see kvstore.bench.vllm_engine.find_vllm_python; CI builds
it in .ci/run). Without one, these tests skip and say why. Engines run with vLLM's own prefix
cache off, so every reuse observed here went through kvstore. vLLM's block_size on CPU is 128
tokens, so a 300-token prompt has 2 full blocks and a 44-token tail.
"""
from __future__ import annotations

import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from kvstore.client import KVClient
from kvstore.core import shmindex
from kvstore.testing.daemon import DaemonProcess, temp_shm_dir
from support.vllm import (BLOCK, MARKS, MAX_TOKENS, VOCAB, baseline_outputs, build_model,
                          connector_engine, gen, plain_engine)

pytestmark = MARKS
_rng = random.Random(1234)


def _toks(n: int) -> list[int]:
    return [_rng.randrange(VOCAB) for _ in range(n)]


A = _toks(300)                          # 2 full blocks + 44-token tail
A2 = A[:260] + _toks(70)                # shares A's 2 blocks, the shared part ends mid-block 3
ALIGNED = A[:256]                       # exactly 2 blocks: the last token must be recomputed
D = _toks(400)                          # used around the daemon outage
E = _toks(290)
SLOW = _toks(280)
LONG = E + _toks(310)                   # E's 2 blocks, then 2 more full blocks and a tail
F = _toks(300)                          # the load-mode tests' prompt (2 full blocks)
G = _toks(300)
H = _toks(300)                          # the streamed-load test's prompt
FILLS = [_toks(7 * BLOCK + 10) for _ in range(4)]   # 28 blocks: more than the small DRAM tier
PROMPTS = {"A": A, "A2": A2, "ALIGNED": ALIGNED, "D": D, "E": E, "SLOW": SLOW, "LONG": LONG,
           "F": F, "G": G, "H": H}
CHAT1 = _toks(200)                      # turn 1: 1 full prompt block; the answer completes block 2
CHAT_ANSWER_TOKENS = 80                 # KV of 279 tokens: block 2 = 72 prompt + 56 generated
CHAT_QUESTION = _toks(40)               # turn 2 = CHAT1 + answer + question (320 tokens)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def model_dir(workdir):
    return build_model(workdir)


@pytest.fixture(scope="module")
def shm():
    d = temp_shm_dir("kvstore-test-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(workdir, shm):
    d = DaemonProcess(workdir, shm, ["--dram-bytes", "128MiB", "--chunk-bytes", "16MiB"])
    d.start()
    yield d
    d.close()


@pytest.fixture(scope="module")
def baseline(model_dir, workdir):
    """Greedy outputs of every prompt from vLLM without the connector, one request at a time."""
    with plain_engine(model_dir, workdir) as eng:
        out = baseline_outputs(eng, PROMPTS)
        out["CHAT1"] = eng.generate([CHAT1], CHAT_ANSWER_TOKENS)["outputs"][0]
        out["CHAT2_PROMPT"] = CHAT1 + out["CHAT1"] + CHAT_QUESTION
        out["CHAT2"] = eng.generate([out["CHAT2_PROMPT"]], MAX_TOKENS)["outputs"][0]
        return out


_TIMEOUTS = {"retry_s": 0.5, "lookup_timeout_s": 0.5, "io_timeout_s": 2.0, "load_timeout_s": 3.0}


def _engine(model_dir, daemon, workdir, name, prefix_caching=False, **extra):
    """An engine with the connector; ``extra`` are connector config keys (quant, model_id)."""
    return connector_engine(model_dir, daemon, workdir, name, timeouts=_TIMEOUTS,
                            prefix_caching=prefix_caching, extra_config=extra)


@pytest.fixture(scope="module")
def engine(model_dir, daemon, workdir, baseline):
    # layer-wise loads (off by default) here; the SSD engine below loads whole (the default)
    with _engine(model_dir, daemon, workdir, "engine1", layerwise_load=True) as eng:
        yield eng


def _gen(eng, name):
    return gen(eng, PROMPTS[name])


def _dram_hits(daemon) -> int:
    with KVClient(daemon.socket, shared_memory=False) as c:
        return sum(t.hits for t in c.stats().tiers)


def test_outputs_equal_and_shared_prefix_loads_from_kvstore(engine, baseline, daemon):
    out, cached = _gen(engine, "A")
    assert out == baseline["A"] and cached == 0          # first time: computed, then stored
    w = engine.stats()["worker"]
    assert w["stored_blocks"] == 2 and w["stored_bytes"] > 0
    hits0 = _dram_hits(daemon)

    out, cached = _gen(engine, "A")                      # repeated prompt
    assert out == baseline["A"] and cached == 2 * BLOCK
    out, cached = _gen(engine, "A2")                     # shares 260 tokens: 2 whole blocks
    assert out == baseline["A2"] and cached == 2 * BLOCK
    out, cached = _gen(engine, "ALIGNED")                # block-aligned: last block recomputed
    assert out == baseline["ALIGNED"] and cached == BLOCK

    s = engine.stats()
    assert s["worker"]["loaded_blocks"] == 5
    assert s["worker"]["loaded_bytes"] == 5 * s["worker"]["stored_bytes"] // 2
    assert s["worker"]["load_failed_blocks"] == 0 and s["scheduler"]["fallbacks"] == 0
    assert s["scheduler"]["hit_tokens"] == 5 * BLOCK
    # DRAM hits of a few blocks load in the step that schedules them (docs/integrations/vllm.md, "Load modes")
    assert s["scheduler"]["sync_loads"] == 3 and s["scheduler"]["async_loads"] == 0
    # ... scattered layer by layer while the forward ran: vLLM's attention waited for each
    # layer (wait_for_layer_load) before reading it, in every one of those steps
    assert s["worker"]["layerwise_loads"] == 3 and s["worker"]["layer_wait_misses"] == 0
    assert _dram_hits(daemon) - hits0 == 5               # the daemon served those 5 blocks


def test_a_chat_turn_reuses_the_previous_turns_answer(engine, baseline):
    """Blocks of generated tokens are stored too: the next turn's prompt repeats the answer."""
    stored0 = engine.stats()["worker"]["stored_blocks"]
    r = engine.generate([CHAT1], CHAT_ANSWER_TOKENS)
    assert r["outputs"][0] == baseline["CHAT1"] and r["num_cached_tokens"][0] == 0
    # block 1 (prompt) and block 2 (72 prompt tokens + 56 generated ones)
    assert engine.stats()["worker"]["stored_blocks"] - stored0 == 2
    r = engine.generate([baseline["CHAT2_PROMPT"]], MAX_TOKENS)
    assert r["outputs"][0] == baseline["CHAT2"]
    assert r["num_cached_tokens"][0] == 2 * BLOCK        # prompt-only storing would give 1 block


def test_second_engine_reuses_first_engines_blocks(engine, model_dir, daemon, workdir, baseline):
    for name in ("E", "LONG"):                           # engine 1 computes and stores 4 blocks
        out, _ = _gen(engine, name)
        assert out == baseline[name]
    # Engine 2 runs with vLLM's own prefix cache on, as `vllm serve` does by default.
    with _engine(model_dir, daemon, workdir, "engine2", prefix_caching=True) as eng2:
        out, cached = _gen(eng2, "E")
        assert out == baseline["E"] and cached == 2 * BLOCK
        w = eng2.stats()["worker"]
        assert w["loaded_blocks"] == 2 and w["stored_blocks"] == 0
        # vLLM's own cache now holds E's 2 blocks; kvstore supplies only the 2 beyond them.
        out, cached = _gen(eng2, "LONG")
        assert out == baseline["LONG"] and cached == 4 * BLOCK
        w = eng2.stats()["worker"]
        assert w["loaded_blocks"] == 4 and w["stored_blocks"] == 0
        # Served by vLLM's own cache alone: nothing to load, and nothing the store holds is
        # copied out of the pages and sent again
        out, cached = _gen(eng2, "LONG")
        assert out == baseline["LONG"] and cached == 4 * BLOCK
        w = eng2.stats()["worker"]
        assert w["loaded_blocks"] == 4 and w["stored_blocks"] == 0
        assert w["store_present_blocks"] == 0


def test_quantized_blocks_half_the_bytes(model_dir, daemon, workdir):
    """`quant: int8` stores the engine's blocks quantized; a repeated prompt loads them back
    (dequantized) and decodes as many tokens as without the connector."""
    # Another layout of the same model: it needs a model id of its own on this daemon.
    with _engine(model_dir, daemon, workdir, "engine-int8", quant="int8",
                 model_id="tiny-llama-int8") as eng:
        out, cached = _gen(eng, "E")
        assert cached == 0 and len(out) == MAX_TOKENS
        assert eng.stats()["worker"]["stored_blocks"] == 2
        out, cached = _gen(eng, "E")
        assert cached == 2 * BLOCK and len(out) == MAX_TOKENS
        w = eng.stats()["worker"]
        assert w["loaded_blocks"] == 2 and w["load_failed_blocks"] == 0
        # one byte per bf16 value plus 8 bytes of scales per layer: about half
        plain = _bf16_block_bytes(model_dir)
        assert plain / 2 < w["stored_bytes"] / w["stored_blocks"] < 0.51 * plain
        # greedy tokens usually match vLLM's own; quantization may flip a near-tie: not asserted


def _bf16_block_bytes(model_dir: str) -> int:
    import json
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * BLOCK * cfg["num_key_value_heads"] * head * 2


def test_daemon_killed_then_back(engine, daemon, baseline):
    daemon.kill()
    for name in ("D", "A"):                              # A was cached: now a miss, recomputed
        out, cached = _gen(engine, name)
        assert out == baseline[name] and cached == 0
    assert engine.stats()["scheduler"]["fallbacks"] > 0

    daemon.start()                                       # same socket, empty store
    deadline = time.monotonic() + 30                     # the connector's backoff is <= 10 s
    while True:                                          # D is stored again, then hits resume
        out, cached = _gen(engine, "D")
        assert out == baseline["D"]
        if cached:
            break
        assert time.monotonic() < deadline, "no hits 30 s after the daemon came back"
        time.sleep(0.5)
    assert cached == 3 * BLOCK and _dram_hits(daemon) == 3
    # The lookups that fell back while it was down were reported to the restarted daemon.
    deadline = time.monotonic() + 10
    with KVClient(daemon.socket, shared_memory=False) as c:
        while c.stats().recompute_fallbacks < 2:
            assert time.monotonic() < deadline, f"reported: {c.stats().recompute_fallbacks}"
            time.sleep(0.1)


def test_daemon_stalled_requests_still_complete(engine, daemon, baseline):
    fallbacks0 = engine.stats()["scheduler"]["fallbacks"]
    daemon.proc.send_signal(signal.SIGSTOP)              # alive but answering nothing
    try:
        # Same-host lookups trust the index snapshot until its heartbeat is stale
        # (kvstore.core.shmindex.STALE_S); past that the scheduler asks the stalled daemon.
        time.sleep(2 * shmindex.STALE_S)
        t0 = time.monotonic()
        out, cached = _gen(engine, "SLOW")
        assert out == baseline["SLOW"] and cached == 0
        assert time.monotonic() - t0 < 30
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert engine.stats()["scheduler"]["fallbacks"] > fallbacks0
    deadline = time.monotonic() + 30
    while _gen(engine, "SLOW") != (baseline["SLOW"], 2 * BLOCK):  # stored again, then a hit
        assert time.monotonic() < deadline, "no hits 30 s after the daemon resumed"
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# Load modes: a DRAM hit loads synchronously (straight from the arena, in the step that
# schedules it), any other asynchronously; a synchronous load that fails is recomputed.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ssd_daemon(workdir):
    """A daemon whose DRAM tier holds 16 of the tiny model's 256 KiB blocks, over an SSD tier
    (write-through): older blocks are demoted to SSD as newer ones arrive. Its own shm
    directory: _stale_generations finds its arena's generation table there."""
    shm = temp_shm_dir("kvstore-test-")
    home = workdir / "ssd-daemon"
    home.mkdir()
    d = DaemonProcess(home, shm, [
        "--dram-bytes", "4MiB", "--chunk-bytes", "1MiB", "--ssd-dir", str(home / "ssd"),
        "--ssd-bytes", "64MiB", "--ssd-segment-bytes", "8MiB",
        "--ssd-write-policy", "write_through"])
    try:
        d.start()
        yield d
    finally:
        d.close()
        shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture(scope="module")
def ssd_engine(model_dir, ssd_daemon, workdir, baseline):
    with _engine(model_dir, ssd_daemon, workdir, "engine-ssd") as eng:
        yield eng


def _loads(eng) -> tuple[int, int]:
    s = eng.stats()["scheduler"]
    return s["sync_loads"], s["async_loads"]


def test_ssd_hit_loads_asynchronously_dram_hit_synchronously(ssd_engine, baseline):
    out, cached = _gen(ssd_engine, "F")                  # computed, stored (DRAM and SSD)
    assert out == baseline["F"] and cached == 0
    for p in FILLS:                                      # F's blocks are demoted to SSD
        gen(ssd_engine, p)
    sync0, async0 = _loads(ssd_engine)
    out, cached = _gen(ssd_engine, "F")                  # an SSD hit: loaded asynchronously
    assert out == baseline["F"] and cached == 2 * BLOCK
    assert _loads(ssd_engine) == (sync0, async0 + 1)
    out, cached = _gen(ssd_engine, "F")                  # promoted by that get: now DRAM
    assert out == baseline["F"] and cached == 2 * BLOCK
    assert _loads(ssd_engine) == (sync0 + 1, async0 + 1)
    w = ssd_engine.stats()["worker"]
    assert w["load_failed_blocks"] == 0 and w["sync_reread_blocks"] == 0
    assert w["layerwise_loads"] == 0                     # the default: whole, before the forward


@pytest.fixture(scope="module")
def stream_engine(model_dir, ssd_daemon, workdir, baseline):
    with _engine(model_dir, ssd_daemon, workdir, "engine-stream", layerwise_load=True,
                 stream_slow_loads=True) as eng:
        yield eng


def test_an_ssd_hit_streams_layer_by_layer_into_the_step_that_schedules_it(stream_engine,
                                                                          baseline):
    """stream_slow_loads: an SSD hit loads in the step that schedules it (no extra step), its
    blocks' layers landing in their slots while the forward runs the layers already there; the
    tokens are vLLM's own."""
    out, cached = _gen(stream_engine, "H")               # computed, stored (DRAM and SSD)
    assert out == baseline["H"] and cached == 0
    for p in FILLS:                                      # H's blocks are demoted to SSD
        gen(stream_engine, p)
    sync0, async0 = _loads(stream_engine)
    w0 = stream_engine.stats()["worker"]
    out, cached = _gen(stream_engine, "H")               # an SSD hit, streamed
    assert out == baseline["H"] and cached == 2 * BLOCK
    assert _loads(stream_engine) == (sync0 + 1, async0)
    w = stream_engine.stats()["worker"]
    assert w["streamed_loads"] - w0["streamed_loads"] == 1
    assert w["streamed_blocks"] - w0["streamed_blocks"] == 2
    assert w["loaded_blocks"] - w0["loaded_blocks"] == 2
    assert w["load_failed_blocks"] == w0["load_failed_blocks"]
    assert w["layer_wait_misses"] == 0                   # the forward waited for every layer
    out, cached = _gen(stream_engine, "H")               # promoted by that read: now DRAM
    assert out == baseline["H"] and cached == 2 * BLOCK
    assert stream_engine.stats()["worker"]["streamed_loads"] == w["streamed_loads"]


def _stale_generations(shm_dir: Path) -> None:
    """Bump every arena slot's generation, as if each slot had been handed to a new owner
    (the bytes stay): the generations the index snapshot published no longer prove anything,
    so every lease-free read fails its check; a leased read (Acquire: current generations)
    still succeeds."""
    from kvstore.core import slotgen
    (path,) = Path(shm_dir).glob("*.slotgen")
    table = np.memmap(path, dtype=np.uint32, mode="r+", offset=slotgen._DATA_OFFSET)
    table += np.uint32(1)
    table.flush()
    del table


def test_failed_generation_check_rereads_through_a_lease(ssd_engine, ssd_daemon, baseline):
    out, cached = _gen(ssd_engine, "G")
    assert out == baseline["G"] and cached == 0
    _stale_generations(ssd_daemon.shm_dir)
    sync0, async0 = _loads(ssd_engine)
    reread0 = ssd_engine.stats()["worker"]["sync_reread_blocks"]
    out, cached = _gen(ssd_engine, "G")                  # lookup: DRAM; the arena read fails
    assert out == baseline["G"] and cached == 2 * BLOCK
    assert _loads(ssd_engine) == (sync0 + 1, async0)
    w = ssd_engine.stats()["worker"]
    assert w["sync_reread_blocks"] - reread0 == 2 and w["load_failed_blocks"] == 0


def test_sync_load_failing_midway_is_recomputed(ssd_engine, ssd_daemon, baseline):
    """The scheduler finds the blocks in DRAM, then the daemon stops answering: the arena read
    fails its check (stale generations) and the leased read times out. vLLM recomputes the
    blocks (load errors) and the tokens are exactly its own."""
    failed0 = ssd_engine.stats()["worker"]["load_failed_blocks"]
    for _ in range(3):   # the lookup must come within STALE_S of the stop (heartbeat fresh)
        out, _ = _gen(ssd_engine, "G")                   # G cached, in DRAM
        assert out == baseline["G"]
        _stale_generations(ssd_daemon.shm_dir)
        sync0, _ = _loads(ssd_engine)
        ssd_daemon.proc.send_signal(signal.SIGSTOP)
        try:
            out, _ = _gen(ssd_engine, "G")
        finally:
            ssd_daemon.proc.send_signal(signal.SIGCONT)
        assert out == baseline["G"]
        if _loads(ssd_engine)[0] == sync0 + 1:
            break
        time.sleep(2.0)   # the lookup saw a stale snapshot (a miss): the connector backs off
    else:
        pytest.fail("the lookup never answered from a fresh snapshot before the stall showed")
    w = ssd_engine.stats()["worker"]
    assert w["load_failed_blocks"] - failed0 == 2


# ---------------------------------------------------------------------------------------------
# Slow tiers: a hit partly on a slow SSD loads only the prefix that pays; vLLM computes the rest
# ---------------------------------------------------------------------------------------------
PLANNED = _toks(4 * BLOCK + 20)         # 4 full blocks
PLANNED_WARM = _toks(BLOCK + 20)        # proves the connector is back after the daemon restart
# The engine's prefill cost as the connector is told it: 12.8 ms a block. A 256 KiB block of
# the tiny model takes 130 ms to read at 2 MB/s, and microseconds to copy out of DRAM.
PLANNED_PROFILE = [0.0, 1e-4, 0.0]
PLANNED_MODEL_ID = "tiny-llama-planned"
PROMPTS["PLANNED"] = PLANNED


@pytest.fixture(scope="module")
def slow_ssd_daemon(workdir):
    """A daemon whose SSD tier reads at 2 MB/s (ssd_read_limit: a slow disk)."""
    shm = temp_shm_dir("kvstore-test-")
    home = workdir / "slow-ssd-daemon"
    home.mkdir()
    d = DaemonProcess(home, shm, [
        "--dram-bytes", "4MiB", "--chunk-bytes", "1MiB", "--ssd-dir", str(home / "ssd"),
        "--ssd-bytes", "64MiB", "--ssd-segment-bytes", "8MiB",
        "--ssd-write-policy", "write_through", "--ssd-read-limit", "2MB/s"])
    try:
        d.start()
        yield d
    finally:
        d.close()
        shutil.rmtree(shm, ignore_errors=True)


def test_slow_ssd_hit_loads_the_dram_prefix_and_computes_the_rest(model_dir, slow_ssd_daemon,
                                                                   workdir, baseline):
    daemon = slow_ssd_daemon
    with _engine(model_dir, daemon, workdir, "engine-planned", model_id=PLANNED_MODEL_ID,
                 prefill_profile=PLANNED_PROFILE) as eng:
        ref = baseline["PLANNED"]           # vLLM's own tokens, without the connector
        assert gen(eng, PLANNED) == (ref, 0)    # computed and stored
        daemon.stop()
        daemon.start()                      # a restart leaves every block on SSD only
        deadline = time.monotonic() + 30
        while gen(eng, PLANNED_WARM)[1] == 0:   # reconnected once its blocks hit again
            assert time.monotonic() < deadline, "the connector did not come back in 30 s"
            time.sleep(0.5)
        # The chain's root block read back into DRAM: the hit is DRAM, SSD, SSD, SSD.
        with KVClient(daemon.socket) as c:
            ns = c.namespace(PLANNED_MODEL_ID, _tiny_layout(model_dir))
            keys = ns.block_keys(PLANNED)
            assert ns.get(keys[:1]).result(30).shape[0] == 1
            assert ns.lookup(keys).tiers == ["DRAM", "SSD", "SSD", "SSD"]
        s0 = eng.stats()["scheduler"]
        out, cached = gen(eng, PLANNED)
        assert out == ref
        assert cached == BLOCK              # the lookup found 4 blocks; 1 was worth loading
        s = eng.stats()["scheduler"]
        assert s["hit_blocks"] - s0["hit_blocks"] == 4
        assert s["plans"] - s0["plans"] == 1
        assert s["planned_recompute_blocks"] - s0["planned_recompute_blocks"] == 3
        assert s["plan_failures"] == 0 and s["fallbacks"] == s0["fallbacks"]
        assert eng.stats()["worker"]["load_failed_blocks"] == 0


def _tiny_layout(model_dir: str):
    """The layout the connector declares for the tiny model (client/vllm/connector.py)."""
    import json
    from kvstore.client import KVLayout
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return KVLayout(num_layers=cfg["num_hidden_layers"], num_kv_heads=cfg["num_key_value_heads"],
                    head_dim=cfg["hidden_size"] // cfg["num_attention_heads"],
                    block_tokens=BLOCK, dtype="bfloat16")
