"""The quantization math: config, bit-widths, grids, scale fits, estimators, Hadamard, 2:4,
the fake quantizer (`fake_quantize` / `Quantizer`), `QuantLinear` and `quantize_model`.

Read in this order: config.py -> quantizer.py (the composition) -> grids.py, scales.py,
estimators.py (the registered parts) -> linear.py, convert.py (the layer and the swap);
fused.py bridges a config to the Triton kernels.
"""
