"""How the linear layers compute: the numeric modes (fp32, bf16, int8, int4) chosen at load by the model and the
CPU, the group-quantized int8 kernel's binding, prepacking, fusion of layers that share an input, calibration,
and the elementwise ops (norms, rotary, SwiGLU) that run beside the quantized products."""
