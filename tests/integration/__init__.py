"""End-to-end tests: CLI, launchers, integrations (DeepSpeed)."""
