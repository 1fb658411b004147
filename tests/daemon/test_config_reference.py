"""The keys' one declaration (kvstore.core.settings.Field) and what is generated from it: the
typed Config, docs/configuration.md, the adapters' extra-config parsing, the internal keys."""
from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from kvstore.client.adapter_config import (SGLANG_FIELDS, SGLANG_OWN_KEYS, VLLM_FIELDS,
                                           parse_extra_config)
from kvstore.daemon import reference
from kvstore.daemon.config import FIELDS, Config, ConfigError, load_config, user_fields

ROOT = Path(__file__).resolve().parents[2]


def _kvstore(*args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_generated_files_match_the_declarations():
    # Fails after a FIELDS row is added or changed until `kvstore config --reference --write`.
    assert reference.stale(ROOT) == [], "run: kvstore config --reference --write"


def test_cli_reference_prints_the_committed_page():
    r = _kvstore("config", "--reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (ROOT / "docs" / "configuration.md").read_text()
    for f in user_fields():          # every key, with its variable and flag
        assert f"| `{f.name}` |" in r.stdout and f"`$KVSTORE_{f.name.upper()}`" in r.stdout
    for f in VLLM_FIELDS + SGLANG_FIELDS:
        assert f"| `{f.name}` |" in r.stdout
    assert "## vLLM connector" in r.stdout and "## SGLang HiCache backend" in r.stdout
    r = _kvstore("config", "--write")
    assert r.returncode == 2 and "--write goes with --reference" in r.stderr


def test_stale_names_the_file_that_diverged(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "kvstore" / "daemon").mkdir(parents=True)
    (tmp_path / "docs" / "configuration.md").write_text("# hand-written\n")
    src = (ROOT / "kvstore" / "daemon" / "config.py").read_text()
    edited = src.replace("    dram_bytes: int\n", "    dram_bytes: Any\n")
    assert edited != src
    (tmp_path / "kvstore" / "daemon" / "config.py").write_text(edited)
    assert reference.stale(tmp_path) == ["docs/configuration.md", "kvstore/daemon/config.py"]
    reference.write(tmp_path)
    assert reference.stale(tmp_path) == []
    assert (tmp_path / "kvstore" / "daemon" / "config.py").read_text() == src
    with pytest.raises(ConfigError, match="is not one"):    # an installed package: no docs/
        reference.write(tmp_path / "kvstore")


def test_config_attributes_have_real_types():
    hints = typing.get_type_hints(Config)
    assert hints["dram_bytes"] is int and hints["lease_timeout_s"] is float
    assert hints["remote_fill_on_lookup"] is bool and hints["socket"] is str
    assert hints["arena_tenants"] == tuple[str, ...]
    assert all(f.type_name != "Any" for f in FIELDS), [f.name for f in FIELDS
                                                        if f.type_name == "Any"]
    cfg = load_config(env={})
    for f in FIELDS:
        assert isinstance(getattr(cfg, f.name), typing.get_origin(hints[f.name]) or hints[f.name])


def test_units_derive_from_parsers_and_names():
    by = {f.name: f for f in FIELDS}
    assert by["dram_bytes"].unit_name == "bytes" and by["ssd_read_limit"].unit_name == "bytes/s"
    assert by["lease_timeout_s"].unit_name == "seconds"
    assert by["ssd_recovery_limit"].unit_name == "blocks/s"
    assert by["max_batch_blocks"].unit_name == ""


# -- internal keys: tests' knobs, out of the user-facing set ------------------------------------

def test_internal_keys_are_set_only_by_their_variable(tmp_path):
    assert [f.name for f in FIELDS if f.internal] == ["ssd_recovery_limit"]
    cfg = load_config(env={"KVSTORE_INTERNAL_SSD_RECOVERY_LIMIT": "60"})
    assert cfg.ssd_recovery_limit == 60
    assert cfg.sources["ssd_recovery_limit"] == "$KVSTORE_INTERNAL_SSD_RECOVERY_LIMIT"
    f = tmp_path / "kv.toml"
    f.write_text("ssd_recovery_limit = 60\n")
    with pytest.raises(ConfigError, match=r"'ssd_recovery_limit' is an internal setting for "
                                          r"tests.*\$KVSTORE_INTERNAL_SSD_RECOVERY_LIMIT"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match=r"\$KVSTORE_SSD_RECOVERY_LIMIT: 'ssd_recovery_limit' "
                                          r"is an internal setting"):
        load_config(env={"KVSTORE_SSD_RECOVERY_LIMIT": "60"})
    with pytest.raises(ConfigError, match=r"did you mean \$KVSTORE_INTERNAL_SSD_RECOVERY_LIMIT"):
        load_config(env={"KVSTORE_INTERNAL_SSD_RECOVERY_LIMT": "60"})


def test_internal_keys_have_no_flag_and_are_not_printed():
    r = _kvstore("serve", "--dram-bytes", "64MiB", "--ssd-recovery-limit", "60")
    assert r.returncode == 2 and "unrecognized arguments: --ssd-recovery-limit" in r.stderr
    r = _kvstore("config", "--print")
    assert r.returncode == 0, r.stderr
    assert "ssd_recovery_limit" not in r.stdout
    # QoS caps a user sets (a shared disk; memory bandwidth beside a running engine): they stay.
    assert "ssd_read_limit" in r.stdout and "dram_prepare_limit" in r.stdout


# -- ssd_dir without ssd_bytes ----------------------------------------------------------------

def test_ssd_dir_without_ssd_bytes_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"ssd_dir is set \(from --ssd-dir\) but ssd_bytes is "
                                          r"0.*set ssd_bytes too"):
        load_config(env={}, overrides={"ssd_dir": str(tmp_path)})
    assert load_config(env={}, overrides={"ssd_dir": str(tmp_path),
                                          "ssd_bytes": "64MiB"}).ssd_bytes == 64 << 20
    assert load_config(env={}).ssd_bytes == 0          # the default directory alone: no tier
    r = _kvstore("serve", "--dram-bytes", "64MiB", "--ssd-dir", str(tmp_path / "ssd"))
    assert r.returncode == 2, r.stderr
    assert "ssd_dir is set (from --ssd-dir) but ssd_bytes is 0" in r.stderr
    assert not (tmp_path / "ssd").exists()


# -- the adapters' keys: one parser, one error style -------------------------------------------

def test_adapter_keys_get_the_configuration_error_style():
    with pytest.raises(ConfigError) as e:
        parse_extra_config(VLLM_FIELDS, {"sockt": "/x.sock"}, "kv_connector_extra_config")
    assert str(e.value) == ("kv_connector_extra_config: unknown key 'sockt' (did you mean "
                            "socket?)")
    with pytest.raises(ConfigError) as e:
        parse_extra_config(VLLM_FIELDS, {"io_timeout_s": -1}, "kv_connector_extra_config")
    assert str(e.value).startswith("io_timeout_s (from kv_connector_extra_config): must be > 0")
    with pytest.raises(ConfigError, match=r"quant \(from x\): must be one of int8"):
        parse_extra_config(VLLM_FIELDS, {"quant": "int4"}, "x")
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' \(known: socket, address"):
        parse_extra_config(SGLANG_FIELDS, {"zzz": 1}, "extra_config", SGLANG_OWN_KEYS)
    with pytest.raises(ValueError):      # what vLLM and SGLang callers catch
        parse_extra_config(SGLANG_FIELDS, {"tenat": "a"}, "extra_config", SGLANG_OWN_KEYS)


def test_adapter_keys_parse_to_typed_values_with_defaults():
    cfg = parse_extra_config(VLLM_FIELDS, {"max_pending_store_bytes": "256MiB",
                                           "store_generated": "false", "lookup_timeout_s": "2"},
                             "kv_connector_extra_config")
    assert cfg["max_pending_store_bytes"] == 256 << 20 and cfg["store_generated"] is False
    assert cfg["lookup_timeout_s"] == 2.0 and cfg["io_timeout_s"] == 5.0
    assert cfg["socket"] is None and cfg["quant"] == "" and len(cfg) == 17
    assert cfg["stream_slow_loads"] is False and cfg["layerwise_load"] is False
    assert cfg["remote_flush_timeout_s"] == 10.0 and cfg["prefill_profile"] == ()
    cfg = parse_extra_config(VLLM_FIELDS, {"prefill_profile": [0.01, "2e-4", 0]}, "x")
    assert cfg["prefill_profile"] == (0.01, 2e-4, 0.0)
    assert parse_extra_config(VLLM_FIELDS, {"prefill_profile": "0,1e-4,1e-8"},
                              "x")["prefill_profile"] == (0.0, 1e-4, 1e-8)
    for bad in ([1e-4], [0, -1e-4, 0], [0.1, 0, 0], ["a", 1, 2], [0, float("inf"), 0]):
        with pytest.raises(ConfigError, match="prefill_profile"):
            parse_extra_config(VLLM_FIELDS, {"prefill_profile": bad}, "x")
    assert cfg["layerwise_load"] is False and cfg["device_staging_bytes"] == 256 << 20
    cfg = parse_extra_config(SGLANG_FIELDS, {"backend_name": "kvstore", "interface_v1": 1,
                                             "socket": "/run/kv.sock"}, "extra_config",
                             SGLANG_OWN_KEYS)
    assert cfg == {"socket": "/run/kv.sock", "address": None, "tenant": "", "model_id": None,
                   "io_timeout_s": 5.0, "retry_s": 1.0}


@pytest.mark.parametrize("path, table", [("client/vllm/connector.py", "VLLM_FIELDS"),
                                         ("client/sglang.py", "SGLANG_FIELDS")])
def test_adapters_parse_through_the_declared_tables(path, table):
    # vLLM and SGLang are not installed here: check from the source that each adapter reads its
    # keys through parse_extra_config with its table, and keeps no private key dict of its own.
    import ast
    tree = ast.parse((ROOT / path).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) == "parse_extra_config"]
    assert [getattr(c.args[0], "id", None) for c in calls] == [table]
    assigned = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name)}
    assert not assigned & {"_DEFAULTS", "_SGLANG_KEYS"}
