"""The two ways EmbeddingRuntime runs a model file: an ONNX Runtime session or a deserialized TensorRT engine.

This is the loading side of the export stage: export.onnx_export and export.tensorrt write model files and may
import it; nothing here imports them. onnxruntime, tensorrt and torch are imported when a backend is created, so
importing this module costs numpy alone. TensorRT is untested here (no wheels, no GPU; see export.tensorrt).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ModelLoadError


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build and machine offer it, always CPU as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtBackend:
    def __init__(
        self, path: Path, providers: Sequence[str] | None, num_threads: int | None, spin: bool | None = None
    ) -> None:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        kinds = ("Fail", "InvalidProtobuf", "InvalidGraph", "NoSuchFile", "InvalidArgument", "NotImplemented")
        load_errors = (*(getattr(ort_state, kind) for kind in (*kinds, "RuntimeException")), OSError, RuntimeError)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # CUDA-missing and fusion notices are noise for callers
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        if spin is not None:  # None: onnxruntime's default (its idle pool threads spin-wait)
            flag = "1" if spin else "0"
            options.add_session_config_entry("session.intra_op.allow_spinning", flag)
            options.add_session_config_entry("session.inter_op.allow_spinning", flag)
        chosen = list(providers) if providers is not None else default_providers()
        unknown = [p for p in chosen if p not in ort.get_available_providers()]
        if unknown:
            raise ModelLoadError(
                f"{path}: onnxruntime has no provider {', '.join(unknown)} (available: "
                f"{', '.join(ort.get_available_providers())})"
            )
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
        except load_errors as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(f"{path} is not a loadable ONNX model: {first}") from err
        self.providers = self.session.get_providers()
        self.props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.max_batch: int | None = None

    def bind(self, input_name: str, output_name: str) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if input_name not in inputs or output_name not in outputs:
            raise ModelLoadError(
                f"graph inputs {sorted(inputs)} / outputs {sorted(outputs)} do not match the "
                f"metadata ({input_name!r} -> {output_name!r})"
            )
        self.input_name, self.output_name = input_name, output_name
        self.input_shape = list(inputs[input_name].shape)
        self.outputs = outputs

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def run_outputs(self, names: list[str], batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(names, {self.input_name: batch})


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
