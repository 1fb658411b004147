"""A private daemon in a child process, for tests, benchmarks and the demo."""
