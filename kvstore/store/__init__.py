"""The daemon's block state: the index, sessions, namespaces and the put/get protocol."""
