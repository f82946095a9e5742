"""TensorRT: build a serialized engine from the parity-checked ONNX graph, and run such an engine.

UNTESTED HERE: TensorRT wheels cannot be installed in this environment and no NVIDIA GPU is available, so this
module is written against the official TensorRT 10 Python API (Builder / OnnxParser / optimization profile /
execute_async_v3) and kept small. Everything imports lazily; without `tensorrt` or a GPU the export exits
with code 2 naming what is missing.

Precision: fp32 builds with TF32 disabled (so parity can hold at 1e-4), fp16 sets the FP16 builder flag on the
fp32 graph, int8 builds from the QDQ-quantized ONNX graph (explicit quantization: the scales calibrated on
real images by export.onnx_export travel inside the graph, no TensorRT calibrator needed).
Device buffers are torch CUDA tensors: torch is already a dependency and avoids a pycuda/cuda-python one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from export import metadata as meta_io
from export.errors import MissingBackendError, ModelLoadError, ParityError
from export.parity import ParityReport, compare

WORKSPACE_BYTES = 1 << 30


def missing_requirements() -> list[str]:
    """What this machine lacks for TensorRT, in words a user can act on (empty when all is present)."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("the `tensorrt` Python package (pip install tensorrt; NVIDIA Linux/Windows wheels only)")
    try:
        import torch

        if not torch.cuda.is_available():
            missing.append("an NVIDIA GPU visible to CUDA (torch.cuda.is_available() is False)")
    except ImportError:
        missing.append("torch (used for CUDA buffers)")
    return missing


def require_tensorrt() -> Any:
    missing = missing_requirements()
    if missing:
        raise MissingBackendError("TensorRT export needs " + " and ".join(missing))
    import tensorrt as trt

    return trt


def build_engine(
    onnx_path: Path,
    precision: str,
    input_name: str,
    image_shape: tuple[int, int, int],
    min_batch: int,
    opt_batch: int,
    max_batch: int,
) -> bytes:
    """Parse the ONNX graph and build a serialized engine with one optimization profile over the batch axis."""
    trt = require_tensorrt()
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min <= opt <= max batch, got {min_batch}/{opt_batch}/{max_batch}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    # The ONNX graph may also emit the encoder features (for OOD scoring on the ONNX runtime); an engine serves
    # the embedding only, so every other output is unmarked and its buffers are never allocated.
    for i in reversed(range(network.num_outputs)):
        tensor = network.get_output(i)
        if tensor.name == "features":
            network.unmark_output(tensor)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (min_batch, *image_shape), (opt_batch, *image_shape), (max_batch, *image_shape))
    config.add_optimization_profile(profile)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    elif precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers without Q/DQ may still run in half precision
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    return bytes(serialized)


class TensorRTBackend:
    """EmbeddingRuntime's backend for `.engine`/`.plan` files: one execution context, torch CUDA buffers."""

    def __init__(self, path: Path, metadata: dict[str, Any]) -> None:
        missing = missing_requirements()
        if missing:
            raise ModelLoadError(f"{path}: running a TensorRT engine needs " + " and ".join(missing))
        import tensorrt as trt
        import torch

        self._torch = torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ModelLoadError(f"{path} is not a TensorRT engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        self.providers = ["TensorRT"]
        profile = metadata.get("tensorrt_profile") or {}
        self.max_batch = int(profile["max"]) if "max" in profile else None
        self.props = None

    def bind(self, input_name: str, output_name: str) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if input_name not in names or output_name not in names:
            raise ModelLoadError(
                f"engine tensors {names} do not match the metadata ({input_name!r} -> {output_name!r})"
            )
        self.input_name, self.output_name = input_name, output_name
        self.input_shape = list(self.engine.get_tensor_shape(input_name))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        y = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, y.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return y.cpu().numpy()


def export_tensorrt(
    checkpoint: str | Path,
    out: str | Path,
    *,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int = 32,
    max_batch: int = 256,
    **onnx_kwargs: Any,
) -> ParityReport:
    """ONNX export (with its parity checks) -> engine -> parity of the engine itself -> atomic write of the
    engine and its `.meta.json` sidecar."""
    from export.onnx_export import export_checkpoint, load_images, torch_reference
    from models.checkpoint import load_checkpoint

    require_tensorrt()
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="lpjepa-trt-") as tmp_dir:
        tmp = Path(tmp_dir)
        onnx_path = tmp / "model.onnx"
        onnx_precision = "int8" if precision == "int8" else "fp32"
        report = export_checkpoint(checkpoint, onnx_path, precision=onnx_precision, **onnx_kwargs)
        metadata = meta_io.read_metadata(onnx_path)
        shape = (metadata["in_channels"], metadata["image_size"], metadata["image_size"])
        engine = build_engine(onnx_path, precision, metadata["input_name"], shape, min_batch, opt_batch, max_batch)
        metadata.update(precision=precision, tensorrt_profile={"min": min_batch, "opt": opt_batch, "max": max_batch})
        engine_path = tmp / ("model" + (out.suffix or ".engine"))
        engine_path.write_bytes(engine)
        meta_io.write_engine_metadata(engine_path, metadata)
        if onnx_kwargs.get("parity", True):
            from export.runtime import EmbeddingRuntime

            model, _ = load_checkpoint(checkpoint)
            images = load_images(
                onnx_kwargs.get("parity_source"),
                model.config.in_channels,
                onnx_kwargs.get("parity_images", 512),
                purpose="parity",
            ).images
            _, reference = torch_reference(model, model.config, images)
            got = EmbeddingRuntime(engine_path).embed_dense(images, progress=onnx_kwargs.get("progress", False))
            tolerance = onnx_kwargs.get("tolerance") if precision != "fp32" else None
            report.checks.append(compare(reference, got, precision, backend="tensorrt", tolerance=tolerance))
            if not report.passed:
                raise ParityError(report, "TensorRT parity failed: " + "; ".join(report.failures))
            metadata["parity"] = report.summary()
        meta_io.write_bytes_atomic(out, engine)
        meta_io.write_engine_metadata(out, metadata)
    report.output = str(out)
    return report
