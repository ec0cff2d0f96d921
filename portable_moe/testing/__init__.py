"""Tooling for tests and fuzzing: hostile bundles and the pytest plugin (``--portable-moe-backend``)."""
