"""The daemon's domain: the block table (the one owner of block state), sessions, namespaces and
the put/get protocol over the tiers."""
