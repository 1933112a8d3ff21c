"""The C kernels' sources and their build: compiled on first use with the system compiler for the host CPU,
cached by source, flags and CPU; None where they do not build (the callers then take their torch path)."""
