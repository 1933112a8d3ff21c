"""Where a model comes from and how it is loaded: the store (built-in names, hub ids, PyPI-packaged and local GGUF
files, folders; pull, verify, manifest), GGUF checks, and the loader (device, numeric mode, threads, facts)."""
