"""kvstore's tiers as the medium strings of vLLM's KV events (what vLLM's CPU offloading and
the routers use): dependency-free, so the block table can name them."""
MEDIUM_GPU = "GPU"          # the HBM tier
MEDIUM_CPU = "CPU"          # the DRAM tier (the shared arena)
MEDIUM_STORAGE = "STORAGE"  # the SSD tier
