"""Multi-rank tests: real spawned gloo ranks via tests.harness.run_ranks."""
