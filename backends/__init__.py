"""Built-in backend adapters, one module each, registered through the ``portable_moe.backends``
entry-point group exactly as a vendor's own package registers its adapter."""
