"""Packed low-bit models: the export format, packing, and the integer forward.

    format.py   the file format (read its docstring to decode a file without this code)
    packing.py  dense bit-packing of integer codes
    linear.py   PackedLinear: the CPU reference forward (integer matmul or dequantize)
    export.py   export_packed / export_checkpoint: trained fake-quant model -> directory
    load.py     load_packed: directory -> PackedModel(net, tokenizer, config, step)
    cpu_int4.py the CPU backend: torch's int4 weight-packed matmul for uniform-grid weights
    gguf_export.py     export_gguf: a checkpoint -> a llama.cpp GGUF file
    gguf_tensors.py    GGUF blocks (Q4_0, Q4_1, Q8_0) from training's codes, and the tensor list
    gguf_tokenizer.py  the tokenizer as GGUF metadata (copied or converted)

The public entry points are also `qat.load_packed` and `qat.export_packed`.
"""
