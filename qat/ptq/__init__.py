"""Post-training quantization baselines: round-to-nearest (the quantized model as it is) and
GPTQ in the quantizer's rotated basis, calibrated block by block. Their checkpoints are
ordinary train.py checkpoints: evaluate, export and QAT (`init_from=`) take them as they are."""
