"""Scheduler-aware prefetch: hints from the engine move blocks up the tiers ahead of use."""
