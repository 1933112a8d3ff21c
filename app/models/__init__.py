"""The model: where its weights come from, how its linear layers compute, and the steps that run it.

Four rooms, each importing only the rooms below it (tests/test_architecture.py checks):
- loading/   sources (built-in names, hub ids, GGUF files, folders), the store, and the loader;
- layers/    per-architecture decode and prompt steps and the attention kernels' bindings;
- numerics/  the numeric modes of the linear layers and their kernel, and the elementwise ops around them;
- kernels/   the C sources and how they are compiled for the CPU they run on.
Nothing here imports the engine, the API or the tasks.
"""
