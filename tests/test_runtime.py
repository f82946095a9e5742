"""EmbeddingRuntime: the torch-free inference path of index/ and serve/, checked against the training pipeline."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import grey_batch, tiny_config
from onnx import TensorProto, helper
from PIL import Image
from scipy import sparse

from data.sources import open_source, sample_image_files
from export import metadata as meta_io
from export.onnx_export import export_checkpoint, torch_reference
from export.parity import FP32_MAX_ABS_ERR
from export.preprocess import Preprocessor
from export.runtime import EmbeddingRuntime, ImageDecodeError, ModelLoadError
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ModelConfig
from models.encoder import build_model
from models.preprocess import eval_transform

REPO = Path(__file__).resolve().parents[1]


def _open(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img


@pytest.fixture(scope="module")
def sample_images() -> list[Image.Image]:
    """All 100 real sample images (colour JPEG/PNG of several sizes, grey PNG) plus synthetic odd shapes/modes."""
    images = [_open(p) for p in sample_image_files()]
    rng = np.random.default_rng(0)
    for mode, (h, w) in zip(
        ["RGBA", "P", "LA", "CMYK", "I;16", "1", "RGB", "L"],
        [(1, 300), (300, 1), (29, 31), (57, 40), (64, 64), (33, 90), (500, 17), (27, 28)],
        strict=True,
    ):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels).convert(mode))
    return images


def _export(tmp: Path, config: ModelConfig, calib: torch.Tensor) -> tuple[Path, Path]:
    torch.manual_seed(2)
    model = build_model(config)
    model.train()
    with torch.no_grad():
        model(calib)
    model.eval()
    ckpt = save_checkpoint(tmp / "model.safetensors", model)
    out = tmp / "model.onnx"
    # the TorchScript exporter is ~10x quicker; the default exporter is covered by tests/test_export.py
    export_checkpoint(ckpt, out, exporter="torchscript", parity_images=32)
    return ckpt, out


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory) -> tuple[Path, Path]:
    return _export(tmp_path_factory.mktemp("rt-grey"), tiny_config(projector_dims=[48]), grey_batch(128))


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory, sample_images) -> tuple[Path, Path]:
    config = ModelConfig(backbone="resnet18", backbone_kwargs={"width": 0.125}, projector_dims=[32, 40], image_size=32)
    tf = eval_transform(config)
    return _export(tmp_path_factory.mktemp("rt-colour"), config, torch.stack([tf(i) for i in sample_images[:60]]))


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3), (33, 1), (64, 3), (224, 3)])
def test_preprocessing_equals_the_training_eval_transform(sample_images, size, channels):
    mean = [0.5] if channels == 1 else [0.485, 0.456, 0.406]
    std = [0.25] if channels == 1 else [0.229, 0.224, 0.225]
    config = ModelConfig(image_size=size, in_channels=channels, mean=mean, std=std)
    expected = torch.stack([eval_transform(config)(img) for img in sample_images]).numpy()
    got = Preprocessor(size, channels, mean, std)(sample_images)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)  # bit for bit, not merely close


def test_bytes_paths_and_arrays_preprocess_like_pil(colour_model, grey_model):
    files = sample_image_files("imagenet")[:3] + sample_image_files("cifar10")[:2] + sample_image_files("mnist")[:2]
    for _, path in (colour_model, grey_model):
        rt = EmbeddingRuntime(path)
        from_pil = rt.preprocess([_open(f) for f in files])
        np.testing.assert_array_equal(rt.preprocess([f.read_bytes() for f in files]), from_pil)
        np.testing.assert_array_equal(rt.preprocess(files), from_pil)
        arrays = [np.asarray(_open(f)) for f in files]
        np.testing.assert_array_equal(rt.preprocess(arrays), from_pil)


def test_runtime_metadata_and_embeddings_match_pytorch(grey_model):
    ckpt, path = grey_model
    rt = EmbeddingRuntime(path, batch_size=16, num_threads=1)
    assert rt.path == path and rt.dim == 48 and rt.providers == ["CPUExecutionProvider"]
    m = rt.metadata
    assert (m["image_size"], m["in_channels"], m["precision"], m["method"]) == (28, 1, "fp32", "rectified_lpjepa")
    assert isinstance(m["target_p"], float) and isinstance(m["opset"], int) and isinstance(m["mean"], list)
    assert m["expected_l0"] == pytest.approx(0.5)  # mu = 0: half the mass of GN_1(0, sigma) is positive
    assert rt.ood_calibration is None

    src = open_source("fashion-mnist:test")
    images = [src.image(i) for i in range(37)]
    model, _ = load_checkpoint(ckpt)
    pre, ref = torch_reference(model, model.config, images)
    csr = rt.embed(images)
    assert sparse.isspmatrix_csr(csr) and csr.dtype == np.float32 and csr.shape == (37, 48)
    dense = csr.toarray()
    assert np.abs(dense - ref).max() <= FP32_MAX_ABS_ERR
    assert csr.nnz == np.count_nonzero(dense) and 0 < csr.nnz < dense.size  # only non-zeros are stored
    np.testing.assert_array_equal(rt.embed_dense(images, batch_size=5), dense)  # chunking changes nothing
    np.testing.assert_allclose(rt.run(pre), dense, atol=1e-6)
    assert rt.embed([]).shape == (0, 48) and rt.run(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 48)


def test_colour_model_accepts_grey_and_odd_images(colour_model, sample_images):
    ckpt, path = colour_model
    rt = EmbeddingRuntime(path, batch_size=7)
    model, _ = load_checkpoint(ckpt)
    _, ref = torch_reference(model, model.config, sample_images)
    got = rt.embed_dense(sample_images, progress=True)
    assert got.shape == (len(sample_images), 40)
    assert np.abs(got - ref).max() <= FP32_MAX_ABS_ERR


def test_bad_images_name_their_index(grey_model):
    rt = EmbeddingRuntime(grey_model[1], batch_size=2)
    good = sample_image_files("mnist")[0].read_bytes()
    png = io.BytesIO()
    Image.new("L", (30, 30)).save(png, format="PNG")
    truncated = png.getvalue()[:40]
    cases = [
        (b"this is not an image", "cannot decode"),
        (truncated, "cannot decode"),
        (b"", "empty"),
        (np.zeros((4, 4), np.float32), "uint8"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (3.5, "type"),
    ]
    for bad, message in cases:
        with pytest.raises(ImageDecodeError, match=f"image 3: .*{message}") as info:
            rt.embed([good, good, good, bad, good])
        assert info.value.index == 3 and isinstance(info.value, ValueError)


def test_run_rejects_wrong_shapes(grey_model):
    rt = EmbeddingRuntime(grey_model[1])
    for shape in [(2, 3, 28, 28), (2, 1, 32, 32), (1, 28, 28)]:
        with pytest.raises(ValueError, match="expected input of shape"):
            rt.run(np.zeros(shape, np.float32))


def test_unloadable_models_raise_model_load_error(grey_model, tmp_path):
    _, good = grey_model
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(good.read_bytes()[:500])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07" + bytes(range(256)) * 4)
    foreign = tmp_path / "foreign.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    onnx.save(helper.make_model(graph), str(foreign))
    wrong_suffix = tmp_path / "model.bin"
    wrong_suffix.write_bytes(good.read_bytes())
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    meta_io.write_engine_metadata(engine, meta_io.read_metadata(good))
    cases = [
        (tmp_path / "missing.onnx", "no model file"),
        (corrupt, "not a loadable ONNX"),
        (garbage, "not a loadable ONNX"),
        (foreign, "not an lpjepa export"),
        (wrong_suffix, "unsupported model file type"),
        (engine, "tensorrt"),
    ]
    for path, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            EmbeddingRuntime(path)
    with pytest.raises(ModelLoadError, match="not an lpjepa export"):
        meta_io.read_metadata(foreign)
    with pytest.raises(ModelLoadError, match="no provider"):
        EmbeddingRuntime(good, providers=["NoSuchExecutionProvider"])


def test_ood_calibration_sidecar_then_embedded(grey_model, tmp_path):
    copy = tmp_path / "model.onnx"
    copy.write_bytes(grey_model[1].read_bytes())
    meta_io.ood_sidecar(copy).write_text(json.dumps({"from": "sidecar"}))
    rt = EmbeddingRuntime(copy)
    assert rt.ood_calibration == {"from": "sidecar"}
    meta_io.write_ood_calibration(copy, {"from": "metadata", "q": [0.1, 0.9]})
    assert EmbeddingRuntime(copy).ood_calibration == {"from": "metadata", "q": [0.1, 0.9]}


def test_serving_path_never_imports_torch(grey_model):
    """serve/ and index/ must run from an .onnx file with numpy, Pillow, scipy and onnxruntime alone."""
    code = (
        "import sys\n"
        "from export.runtime import EmbeddingRuntime\n"
        f"rt = EmbeddingRuntime({str(grey_model[1])!r})\n"
        f"z = rt.embed([open({str(sample_image_files('mnist')[0])!r}, 'rb').read()])\n"
        "assert z.shape == (1, rt.dim)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'onnx'))\n"
        "print(bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
