"""The steps that run a model's layers: the written-out decode and prompt steps per architecture, their layers in
one C call, and the attention kernels (decode over the ragged KV cache, whole prompts) with their bindings."""
