"""`kvstore demo` and `kvstore bench ttft`, run small against a real daemon."""
from __future__ import annotations

import json

from kvstore.daemon.cli import main


def test_demo_reuses_the_document_and_matches_plain_generation(daemon, capsys):
    rc = main(["demo", "--socket", daemon.socket, "--model", "tiny", "--turns", "3", "--doc-tokens", "80",
               "--question-tokens", "8", "--answer-tokens", "3", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    turns = r["turns"]
    # turn prompts: 80+8=88, 88+3+8=99, 99+3+8=110 tokens; blocks of 16 stored by each turn
    assert [t["cached_tokens"] for t in turns] == [0, 80, 96]
    assert all(t["same_tokens"] and not t["fallback"] for t in turns)
    assert 0 < r["hit_rate"] < 1


def test_demo_rejects_bad_arguments(capsys):
    assert main(["demo", "--turns", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_bench_ttft_small_shape(daemon, capsys):
    rc = main(["bench", "ttft", "--shape", "demo", "--layers", "2", "--hidden", "128",
               "--intermediate", "256", "--heads", "4", "--kv-heads", "2", "--vocab", "512",
               "--dtype", "float32", "--sizes", "64", "--reps", "1", "--socket", daemon.socket,
               "--json", "--no-progress"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    (p,) = r["points"]
    assert p["reused_tokens"] == 48 and p["computed_tokens"] == 16
    assert p["bytes_loaded"] == 3 * r["model"]["block_bytes"]
    assert p["dram_tiers"] == ["DRAM"]
    assert all(p["same_first_token"].values())
    assert len(p["timeline_ms"]["loaded"]) == 2
    assert r["ssd_status"].startswith("skipped")


def test_bench_help_reaches_the_dispatcher(capsys):
    assert main(["bench", "--help"]) == 0
    assert "ttft" in capsys.readouterr().out


def test_bench_dispatcher_errors(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert main(["bench", "ttft", "--sizes", "100"]) == 2
    assert "multiples" in capsys.readouterr().err
