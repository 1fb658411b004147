"""What the SDK and the daemon share: block keys, KV layouts, errors and reasons, sizes, and the formats of the shared-memory files (arena, slot generations, index snapshot)."""
