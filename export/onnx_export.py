"""Checkpoint -> one ONNX file (fp32, fp16 or int8) that maps a preprocessed batch to the rectified embedding.

Every export is checked before anything is written: the fp32 graph must reproduce PyTorch on real images
(export.parity), and a converted graph (fp16, int8) must keep the activation rate and retrieval within the
stated tolerances; otherwise ParityError is raised and `out` is left untouched.

Exporter choice: torch 2.14's default `torch.export`-based exporter ("dynamo") gives the same parity as the
legacy TorchScript exporter (max |err| ~1e-7 on all three backbone families) and is the one PyTorch maintains,
so it is the default; "torchscript" remains selectable because it is about 10x faster to run and handles some
models that torch.export cannot trace.
"""

from __future__ import annotations

import datetime as _dt
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export import metadata as meta_io
from export.errors import ExportError
from export.parity import ParityReport, compare
from export.runtime import EmbeddingRuntime

PRECISIONS = ("fp32", "fp16", "int8")
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
MIN_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "embedding"
FEATURES_NAME = "features"  # optional second output: the backbone's pooled features, for OOD scoring
DEFAULT_PARITY_IMAGES = 512
DEFAULT_CALIBRATION_IMAGES = 256
COLOUR_SAMPLE_KINDS = ("cifar10", "cifar100", "imagenet")


@dataclass
class ImageSet:
    """Real images for parity or calibration, with the spec that names them (recorded in the report)."""

    name: str
    images: list[Any]


def _evenly_spaced(n_total: int, limit: int) -> list[int]:
    """Spread the picks over the whole source so every class and image size is represented."""
    return list(range(n_total)) if n_total <= limit else sorted({int(i) for i in np.linspace(0, n_total - 1, limit)})


def load_images(spec: str | None, in_channels: int, limit: int, *, purpose: str) -> ImageSet:
    """`spec` is any data.sources spec; None picks the real data named in docs/DATA.md for the channels:
    Fashion-MNIST (test split for parity, train split for calibration) for grey models, the colour sample
    images (CIFAR-10/100, ImageNet) for colour models."""
    from data.sources import DataSpecError, open_image, open_source, sample_image_files

    if limit < 1:
        raise ExportError(f"{purpose} needs at least one image, got a limit of {limit}")
    try:
        if spec is None and in_channels == 3:
            files = [f for kind in COLOUR_SAMPLE_KINDS for f in sample_image_files(kind)]
            picks = _evenly_spaced(len(files), limit)
            return ImageSet("samples:" + "+".join(COLOUR_SAMPLE_KINDS), [open_image(files[i]) for i in picks])
        if spec is None:
            spec = "fashion-mnist:test" if purpose == "parity" else "fashion-mnist:train"
        source = open_source(spec)
    except DataSpecError as err:
        raise ExportError(f"cannot load {purpose} images: {err}") from err
    if len(source) == 0:
        raise ExportError(f"{purpose} data {spec!r} holds no images")
    picks = _evenly_spaced(len(source), limit)
    return ImageSet(spec, [source.image(i) for i in picks])


def _wrap(model: Any, features: bool = False) -> Any:
    """A module whose forward argument is named like the graph input, so dynamic_shapes can refer to it.

    With `features` the graph also returns the backbone features. They are an intermediate of the embedding, so
    ONNX Runtime computes them anyway and a caller that asks only for the embedding pays nothing for them.
    """
    from torch import nn

    class EmbeddingGraph(nn.Module):
        def __init__(self, encoder: nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, images):  # noqa: ANN001 - traced, not called by users
            if features:
                feats, emb = self.encoder.forward_features(images)
                return emb, feats
            return self.encoder(images)

    return EmbeddingGraph(model).eval()


def torch_to_onnx(
    model: Any, image_shape: tuple[int, int, int], opset: int, exporter: str, *, features: bool = False
) -> Any:
    """Trace `model` (eval mode) into an onnx.ModelProto with a dynamic batch axis named `batch`."""
    import io

    import torch

    wrapped = _wrap(model, features)
    outputs = [OUTPUT_NAME, FEATURES_NAME] if features else [OUTPUT_NAME]
    # batch 2, not 1: torch.export specialises a dimension of size 1, which would pin the batch axis.
    example = torch.zeros((2, *image_shape), dtype=torch.float32)
    names = dict(input_names=[INPUT_NAME], output_names=outputs, opset_version=opset)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                batch = {"images": {0: torch.export.Dim("batch")}}
                program = torch.onnx.export(
                    wrapped, (example,), None, **names, dynamic_shapes=batch, dynamo=True, verbose=False, optimize=True
                )
                proto = program.model_proto
            else:
                buffer = io.BytesIO()
                axes = {name: {0: "batch"} for name in (INPUT_NAME, *outputs)}
                torch.onnx.export(wrapped, (example,), buffer, **names, dynamic_axes=axes, dynamo=False)
                proto = onnx.load_from_string(buffer.getvalue())
    except Exception as err:  # torch.export/TorchScript fail with many exception types; all mean "cannot trace"
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(
            f"the {exporter} exporter cannot export this model ({first}); try --exporter {other}"
        ) from err
    onnx.checker.check_model(proto)
    actual = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    if actual != opset:
        raise ExportError(f"the {exporter} exporter produced opset {actual}, not the requested {opset}")
    return proto


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> None:
    """Static QDQ int8: per-channel int8 weights, uint8 activations, MinMax ranges from real images.

    The graph is pre-processed first (shape inference + fusions) as onnxruntime's docs recommend, so
    BatchNorm is folded before ranges are collected.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """The preprocessed calibration images in batches of 32."""

        def __init__(self, batch: np.ndarray, batch_size: int = 32) -> None:
            self._chunks = [batch[i : i + batch_size] for i in range(0, len(batch), batch_size)]
            self._iter: Iterator[np.ndarray] = iter(self._chunks)

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self._iter, None)
            return None if chunk is None else {INPUT_NAME: chunk}

        def rewind(self) -> None:
            self._iter = iter(self._chunks)

    prepped = out_path.with_name(out_path.stem + ".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=False)
    # The last projector layer stays float: quantizing its output rounds activations below half a step to
    # zero, which alone tripled the l0 drift in our measurements, for one small GEMM's worth of speed.
    nodes = onnx.load(str(prepped), load_external_data=False).graph.node
    last_linear = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")][-1:]
    quantize_static(
        str(prepped),
        str(out_path),
        Reader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=last_linear,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    prepped.unlink(missing_ok=True)


def build_metadata(
    config: Any,
    checkpoint: Path,
    sha256: str,
    precision: str,
    opset: int,
    exporter: str,
    feature_dim: int | None = None,
    ood_calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The exported file's metadata, checked to encode so a bad value fails now, not after minutes of parity."""
    extra = {} if feature_dim is None else {"features_name": FEATURES_NAME, "feature_dim": int(feature_dim)}
    target = config.target
    metadata = {
        **extra,
        "format": meta_io.FORMAT,
        "dim": int(config.embed_dim),
        "method": config.method,
        "backbone": config.backbone,
        "rectify": bool(config.rectify),
        "target_p": target.p,
        "target_mu": target.mu,
        "target_sigma": target.sigma,
        "expected_l0": config.expected_l0,
        "image_size": int(config.image_size),
        "in_channels": int(config.in_channels),
        "mean": [float(v) for v in config.mean],
        "std": [float(v) for v in config.std],
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "checkpoint_sha256": sha256,
        "checkpoint_name": checkpoint.name,
        "precision": precision,
        "opset": int(opset),
        "exporter": exporter,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_config": config.to_dict(),
    }
    if ood_calibration is not None:
        metadata[meta_io.OOD_KEY] = ood_calibration
    try:
        meta_io.encode(metadata)
    except ValueError as err:
        raise ExportError(f"cannot store the metadata: {err}") from err
    return metadata


def check_options(
    precision: str, opset: int | None, exporter: str, tolerance: tuple[float, float] | None = None
) -> int:
    """Validate user choices before any heavy work; returns the opset to use."""
    if tolerance is not None and not (tolerance[0] >= 0 and 0 <= tolerance[1] <= 1):
        raise ExportError(f"tolerance needs l0 drift >= 0 and 0 <= overlap <= 1, got {tolerance}")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    chosen = DEFAULT_OPSET if opset is None else int(opset)
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= chosen <= newest:
        raise ExportError(f"opset {chosen} is not supported; use {MIN_OPSET}..{newest}")
    if exporter == "dynamo" and chosen < 18:
        # torch.export's exporter emits opset 18 and its down-conversion of Reduce*/Split axes fails
        raise ExportError(f"the dynamo exporter needs opset >= 18; use --exporter torchscript for opset {chosen}")
    return chosen


def torch_reference(
    model: Any, config: Any, images: Sequence[Any], batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch fp32 on the training evaluation transform (torchvision): the ground truth of every check."""
    import torch

    from models.preprocess import eval_transform

    transform = eval_transform(config)
    batch = torch.stack([transform(img) for img in images])
    outs = []
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            outs.append(model(batch[start : start + batch_size]).float())
    return batch.numpy(), torch.cat(outs).numpy()


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    precision: str = "fp32",
    opset: int | None = None,
    calibration_source: str | None = None,
    parity: bool = True,
    parity_source: str | None = None,
    parity_images: int = DEFAULT_PARITY_IMAGES,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    exporter: str = "dynamo",
    features: bool = True,
    ood_calibration: dict[str, Any] | None = None,
    tolerance: tuple[float, float] | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> ParityReport:
    """Export a checkpoint (file or run directory) to `out` and return the parity report.

    `tolerance` = (max l0 drift, min top-10 overlap) replaces export.parity.TOLERANCES for fp16/int8.
    `features` adds the backbone features as a second graph output (`features`, metadata `feature_dim`) for the
    OOD scores that use them; the served embedding is unchanged.
    Raises CheckpointError for an unusable checkpoint, ExportError for bad options or missing data, and
    ParityError (carrying the report) when a tolerance is broken; `out` is only written on success.
    """
    from core.atomic_io import file_sha256
    from models.checkpoint import load_checkpoint, resolve_checkpoint

    say = log or (lambda _msg: None)
    chosen_opset = check_options(precision, opset, exporter, tolerance)
    ckpt = resolve_checkpoint(checkpoint)
    model, _extra = load_checkpoint(ckpt)
    config = model.config
    t0 = time.perf_counter()
    eval_set = load_images(parity_source, config.in_channels, parity_images, purpose="parity") if parity else None
    calib_set = None
    if precision == "int8":
        calib_set = load_images(calibration_source, config.in_channels, calibration_images, purpose="calibration")

    say(
        f"exporting {ckpt} ({config.backbone}, dim {config.embed_dim}) with the {exporter} exporter, "
        f"opset {chosen_opset}"
    )
    shape = (config.in_channels, config.image_size, config.image_size)
    proto = torch_to_onnx(model, shape, chosen_opset, exporter, features=features)
    report = ParityReport(
        checkpoint=str(ckpt),
        output=str(Path(out)),
        data=eval_set.name if eval_set else "",
        n_images=len(eval_set.images) if eval_set else 0,
        preprocess_max_abs_err=0.0,
        calibration=calib_set.name if calib_set else None,
        calibration_overlaps_eval=calib_set is not None and eval_set is not None and calib_set.name == eval_set.name,
    )
    report.seconds["export_s"] = time.perf_counter() - t0
    feature_dim = int(model.feature_dim) if features else None
    sha256 = file_sha256(ckpt)
    metadata = build_metadata(config, ckpt, sha256, precision, chosen_opset, exporter, feature_dim, ood_calibration)
    with tempfile.TemporaryDirectory(prefix="lpjepa-export-") as tmp_dir:
        fp32_path = Path(tmp_dir) / "fp32.onnx"
        meta_io.set_onnx_metadata(proto, {**metadata, "precision": "fp32"})
        onnx.save(proto, str(fp32_path))
        reference = None if eval_set is None else _check_fp32(report, fp32_path, model, eval_set.images, progress)
        final_path = _convert(fp32_path, precision, calib_set, report.seconds, say)
        final = onnx.load(str(final_path))
        meta_io.set_onnx_metadata(final, metadata)
        if precision != "fp32":
            onnx.save(final, str(final_path))
            if eval_set is not None and reference is not None:
                _check_converted(report, final_path, precision, reference, eval_set.images, tolerance, progress)
        if eval_set is not None:
            meta_io.set_onnx_metadata(final, {"parity": report.summary()})
        meta_io.save_onnx_atomic(final, out)
    report.seconds["total_s"] = time.perf_counter() - t0
    return report


def _check_fp32(report: ParityReport, fp32_path: Path, model: Any, images: list[Any], progress: bool) -> np.ndarray:
    """fp32 parity (preprocessing and embedding against PyTorch); returns PyTorch's embeddings, the reference of
    every later check."""
    t1 = time.perf_counter()
    torch_pre, reference = torch_reference(model, model.config, images)
    runtime = _cpu_runtime(fp32_path)
    report.preprocess_max_abs_err = float(np.abs(runtime.preprocess(images) - torch_pre).max())
    check = compare(reference, runtime.embed_dense(images, progress=progress), "fp32")
    report.seconds["parity_fp32_s"] = time.perf_counter() - t1
    report.require(check, "fp32")
    return reference


def _check_converted(
    report: ParityReport,
    path: Path,
    precision: str,
    reference: np.ndarray,
    images: list[Any],
    tolerance: tuple[float, float] | None,
    progress: bool,
) -> None:
    """fp16/int8 parity: activation rate and retrieval against PyTorch fp32, within `tolerance`."""
    t1 = time.perf_counter()
    converted = _cpu_runtime(path).embed_dense(images, progress=progress)
    check = compare(reference, converted, precision, tolerance=tolerance)
    report.seconds[f"parity_{precision}_s"] = time.perf_counter() - t1
    report.require(check, precision)


def _convert(
    fp32_path: Path, precision: str, calib_set: ImageSet | None, timings: dict[str, float], say: Callable[[str], None]
) -> Path:
    """The graph of `precision` beside the fp32 one (the fp32 file itself for fp32)."""
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # Weights and activations in float16, float32 at the graph boundary so callers never change dtype.
        fp16 = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True, disable_shape_infer=False)
        path = fp32_path.with_name("fp16.onnx")
        onnx.save(fp16, str(path))
        return path
    if precision == "int8":
        t1 = time.perf_counter()
        assert calib_set is not None
        calib = _cpu_runtime(fp32_path).preprocess(calib_set.images)
        path = fp32_path.with_name("int8.onnx")
        say(f"calibrating int8 on {len(calib)} images of {calib_set.name}")
        quantize_int8(fp32_path, path, calib)
        timings["quantize_s"] = time.perf_counter() - t1
        return path
    return fp32_path


def _cpu_runtime(path: Path) -> Any:
    """Parity always runs on the CPU provider: deterministic, and what every machine that exports has."""
    return EmbeddingRuntime(path, providers=["CPUExecutionProvider"], batch_size=128)
