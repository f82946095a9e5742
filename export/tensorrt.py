"""TensorRT: build a serialized engine from the parity-checked ONNX graph (running one: export.backends).

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

from core.atomic_io import atomic_write_bytes
from export import metadata as meta_io
from export.backends import missing_requirements
from export.errors import MissingBackendError
from export.onnx_export import export_checkpoint, load_images, torch_reference
from export.parity import ParityReport, compare
from export.runtime import EmbeddingRuntime

WORKSPACE_BYTES = 1 << 30


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
            report.require(compare(reference, got, precision, backend="tensorrt", tolerance=tolerance), "TensorRT")
            metadata["parity"] = report.summary()
        atomic_write_bytes(out, engine)
        meta_io.write_engine_metadata(out, metadata)
    report.output = str(out)
    return report
