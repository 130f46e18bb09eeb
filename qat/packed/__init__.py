"""Packed low-bit models: the export format, packing, and the integer forward.

    format.py   the file format (read its docstring to decode a file without this code)
    packing.py  dense bit-packing of integer codes
    linear.py   PackedLinear: the CPU reference forward (integer matmul or dequantize)
    export.py   export_packed / export_checkpoint: trained fake-quant model -> directory
    load.py     load_packed: directory -> PackedModel(net, tokenizer, config, step)

The public entry points are also `qat.load_packed` and `qat.export_packed`.
"""
