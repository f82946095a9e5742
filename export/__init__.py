"""Export stage: checkpoint -> ONNX (fp32/fp16/int8) or TensorRT engine, parity-checked, plus the shared runtime.

`export.runtime.EmbeddingRuntime` is the single inference path used by index/ and serve/; it needs only numpy,
Pillow, scipy and onnxruntime (no torch) so a serving image stays small.
"""
