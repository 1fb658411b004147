"""Storage tiers: where a block's bytes live — DRAM (the shared arena), HBM (a GPU pool), SSD
(slab files) and the remote cluster tier — each behind the Tier protocol of tiers/base.py.
Tiers never import the store or the daemon: the composition root (kvstore.daemon.server) hands
each the block table and the collaborators it needs."""
