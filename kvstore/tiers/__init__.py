"""Storage tiers: where a block's bytes live. DRAM is the shared arena; SSD and HBM come later."""
