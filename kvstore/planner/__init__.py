"""Partial recomputation: which prefix to recompute while the rest loads."""
