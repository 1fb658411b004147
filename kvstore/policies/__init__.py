"""Policies, chosen from the configuration by name: when a tier below DRAM gets a block's bytes
(write policies, kvstore.policies.write) and which blocks a full tier gives up first (eviction
policies, kvstore.policies.eviction)."""
