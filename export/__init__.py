"""Export stage: checkpoint -> ONNX (fp32/fp16/int8) or TensorRT engine, parity-checked, plus the shared runtime."""
