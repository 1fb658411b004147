"""Test-only torchvision stand-in (see tests/sglang_shims/README.md): importable, not usable."""

__version__ = "0.28.0+kvstore.stand.in"
