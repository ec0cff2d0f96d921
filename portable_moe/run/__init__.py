"""Running bundles: fallback over a list of backends, runs in a separate process, the worker pool."""
