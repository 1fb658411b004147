"""Helpers shared by the test files (plain functions and constants, no fixtures: those live in
tests/conftest.py). Imported as ``support.<module>``: tests/conftest.py puts tests/ on sys.path,
so this works from any test file, wherever it sits under tests/.

- ``ssd``: the SSD-tier layout, daemon flags and byte-exact chain put/get helpers.
- ``net``: free ports, the TCP port a daemon bound, and a PNG reader for the dashboard.
- ``hf_models``: tiny seeded Llama models and prompts for the HF adapter tests.
- ``clientproc``, ``readerproc``: client processes run as scripts by path (:data:`SUPPORT`);
  their block bytes are a function of the block key, so a test can check every byte.
"""
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
REPO = SUPPORT.parent.parent
