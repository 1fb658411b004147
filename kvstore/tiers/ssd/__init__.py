"""The SSD tier: slot files, space management, the namespace catalog and journal, GDS, rate limits."""
