"""Daemon statistics: one model of counters and latency histograms; the table, Prometheus, HTTP and dashboard are views of it."""
