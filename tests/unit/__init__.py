"""Single-process unit tests."""
