"""Configuration: defaults <- TOML <- environment <- flags, validated with clear errors."""
import subprocess
import sys

import pytest

from kvstore.daemon.config import ConfigError, load_config
from kvstore.core.units import format_bytes, parse_rate, parse_size


def test_sizes_and_rates():
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("512MB") == 512_000_000
    assert parse_size("1.5k") == 1500
    assert parse_size(123) == 123
    assert parse_rate("200MB/s") == 200_000_000
    assert format_bytes(3 << 20) == "3.0 MiB"
    for bad in ("4 parsecs", "", "-1", "GiB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_precedence_defaults_toml_env_flags(tmp_path):
    f = tmp_path / "kv.toml"
    f.write_text('dram_bytes = "1GiB"\nlease_timeout_s = 7\n[max]\nbatch_blocks = 100\n')
    cfg = load_config(f, env={"KVSTORE_DRAM_BYTES": "2GiB"}, overrides={"socket": "/x.sock"})
    assert cfg.dram_bytes == 2 << 30 and cfg.sources["dram_bytes"] == "$KVSTORE_DRAM_BYTES"
    assert cfg.lease_timeout_s == 7.0 and cfg.sources["lease_timeout_s"] == str(f)
    assert cfg.max_batch_blocks == 100
    assert cfg.socket == "/x.sock" and cfg.sources["socket"] == "--socket"
    cfg = load_config(f, env={"KVSTORE_DRAM_BYTES": "2GiB"}, overrides={"dram_bytes": "3GiB"})
    assert cfg.dram_bytes == 3 << 30
    assert load_config(env={}).chunk_bytes == 64 << 20


@pytest.mark.parametrize("toml,env,msg", [
    ('dram_bytes = "lots"', {}, "dram_bytes"),
    ('nonsense = 1', {}, "unknown key 'nonsense'"),
    ('', {"KVSTORE_LEASE_TIMEOUT_S": "-3"}, "lease_timeout_s (from $KVSTORE_LEASE_TIMEOUT_S)"),
    ('listen = "8080"', {}, "listen: expected host:port"),
    ('dram_bytes = [', {}, "config file"),
])
def test_errors_name_the_key(tmp_path, toml, env, msg):
    f = tmp_path / "kv.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(f, env=env)
    assert msg in str(e.value)


def test_cli_config_print_and_exit_codes(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "kvstore", *a], capture_output=True,
                                    text=True, env={"KVSTORE_DRAM_BYTES": "1GiB"})
    r = run("config", "--print", "--chunk-bytes", "32MiB")
    assert r.returncode == 0, r.stderr
    assert "dram_bytes" in r.stdout and "1.0 GiB" in r.stdout and "$KVSTORE_DRAM_BYTES" in r.stdout
    assert "32.0 MiB" in r.stdout and "(--chunk-bytes)" in r.stdout
    r = run("serve", "--dram-bytes", "plenty")
    assert r.returncode == 2 and "dram_bytes (from --dram-bytes)" in r.stderr
    r = run("config", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "missing.toml" in r.stderr


@pytest.mark.parametrize("toml,env,msg", [
    ('dram_byte = "1GiB"', {}, "unknown key 'dram_byte' (did you mean dram_bytes?)"),
    ('[metrics]\nprot = 9100\n', {}, "unknown key 'metrics_prot' (did you mean metrics_port?)"),
    ('ssd-dirs = "/x"', {}, "(did you mean ssd_dir?)"),
    ('', {"KVSTORE_DRAM_BYTE": "1GiB"},
     "$KVSTORE_DRAM_BYTE: unknown key 'dram_byte' (did you mean $KVSTORE_DRAM_BYTES?)"),
    ('', {"KVSTORE_LEASE_TIMEOUT": "3"}, "(did you mean $KVSTORE_LEASE_TIMEOUT_S?)"),
])
def test_unknown_keys_suggest_the_nearest_known_one(tmp_path, toml, env, msg):
    f = tmp_path / "kv.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(f, env=env)
    assert msg in str(e.value)


def test_other_tools_kvstore_variables_are_left_alone():
    # Variables of the test harness, CI and the Docker build share the prefix but are no typo.
    env = {"KVSTORE_VLLM_PYTHON": "/x/python", "KVSTORE_EXTRAS": "hbm",
           "KVSTORE_TEST_SSD_WRITE_ERRNO": "28", "KVSTORE_TEST_SSD_WRITE_FAIL_AFTER": "3",
           "KVSTORE_DRAM_BYTES": "1GiB"}
    assert load_config(env=env).dram_bytes == 1 << 30


def test_cli_unknown_key_exits_2_with_the_suggestion(tmp_path):
    f = tmp_path / "kv.toml"
    f.write_text('dram_byte = "1GiB"\n')
    r = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--config", str(f)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "did you mean dram_bytes?" in r.stderr, r.stderr
