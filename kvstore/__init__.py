"""kvstore: a tiered KV-cache offloading daemon for LLM inference, and its client SDK."""
__version__ = "0.1.0"
