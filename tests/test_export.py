"""ONNX export: parity with PyTorch on real images, dynamic batch, metadata, quantized precisions, CLI errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import grey_batch, tiny_config
from scipy import stats

from core.atomic_io import DEFAULT_FILE_MODE
from data.sources import open_source, sample_image_files
from export import metadata as meta_io
from export.errors import ExportError, ParityError
from export.onnx_export import (
    FEATURES_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    export_checkpoint,
    load_images,
    torch_reference,
)
from export.parity import FP32_MAX_ABS_ERR, TOLERANCES, compare
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import FASHION_MNIST_MEAN, ModelConfig
from models.encoder import build_model
from models.preprocess import eval_transform

PARITY_IMAGES = 96  # enough for a meaningful top-10 overlap, small enough for a 2-core CI


def _calibrate_bn(model: torch.nn.Module, batch: torch.Tensor) -> torch.nn.Module:
    """Forward real images in train mode so BatchNorm running statistics look like a trained model's."""
    model.train()
    with torch.no_grad():
        for chunk in batch.split(64):
            model(chunk)
    return model.eval()


def _colour_batch(config: ModelConfig) -> torch.Tensor:
    tf = eval_transform(config)
    images = load_images(None, 3, 60, purpose="parity").images
    return torch.stack([tf(img) for img in images])


def make_grey_run(root: Path, mu: float = -0.5) -> Path:
    """A run directory holding a small grey ResNet-18 whose BN statistics come from Fashion-MNIST."""
    torch.manual_seed(0)
    model = _calibrate_bn(build_model(tiny_config(projector_dims=[64, 64], target_mu=mu)), grey_batch(256))
    run = root / "run"
    run.mkdir(parents=True)
    save_checkpoint(run / "model.safetensors", model)
    return run


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-grey")
    run = make_grey_run(root)
    out = root / "model.onnx"
    report = export_checkpoint(run, out, parity_images=PARITY_IMAGES)
    return run, out, report


def test_fp32_export_of_a_small_model_passes_parity_on_fashion_mnist(grey):
    run, out, report = grey
    assert out.is_file() and report.passed
    assert out.stat().st_mode & 0o777 == DEFAULT_FILE_MODE  # readable by a serving user, not 0600
    assert report.data == "fashion-mnist:test" and report.n_images == PARITY_IMAGES
    (check,) = report.checks
    assert check.precision == "fp32" and check.max_abs_err <= FP32_MAX_ABS_ERR
    assert check.support_mismatches == 0 and report.preprocess_max_abs_err == 0.0
    # independent of the exporter's own check: plain onnxruntime vs PyTorch on other real test images
    model, _ = load_checkpoint(run)
    src = open_source("fashion-mnist:test")
    images = [src.image(i) for i in range(5000, 5040)]
    pre, ref = torch_reference(model, model.config, images)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: pre})[0]
    assert np.abs(got - ref).max() <= FP32_MAX_ABS_ERR
    assert got.min() >= 0.0 and 0.05 < np.mean(got > 0) < 0.95  # rectified and genuinely sparse


def test_batch_axis_is_dynamic_and_named_batch(grey):
    run, out, _ = grey
    proto = onnx.load(str(out))
    (inp,), (outp, featp) = proto.graph.input, proto.graph.output
    assert inp.name == INPUT_NAME and outp.name == OUTPUT_NAME and featp.name == FEATURES_NAME
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert outp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert featp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [1, 28, 28]
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    model, _ = load_checkpoint(run)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = grey_batch(7)
    for n in (1, 7):
        got, feats = sess.run(None, {INPUT_NAME: x[:n].numpy()})
        with torch.no_grad():
            ref_feats, ref = (t.numpy() for t in model.forward_features(x[:n]))
        assert got.shape == (n, 64) and feats.shape == (n, model.feature_dim)
        assert np.abs(got - ref).max() <= FP32_MAX_ABS_ERR
        assert np.abs(feats - ref_feats).max() <= 10 * FP32_MAX_ABS_ERR * max(1.0, float(np.abs(ref_feats).max()))


def test_metadata_round_trip(grey):
    run, out, report = grey
    meta = meta_io.read_metadata(out)
    ckpt = run / "model.safetensors"
    assert meta["format"] == meta_io.FORMAT and meta["dim"] == 64 and meta["method"] == "rectified_lpjepa"
    assert meta["image_size"] == 28 and meta["in_channels"] == 1 and meta["rectify"] is True
    assert meta["mean"] == [pytest.approx(FASHION_MNIST_MEAN[0])] and meta["std"] == [pytest.approx(0.3530)]
    assert (meta["target_p"], meta["target_mu"], meta["target_sigma"]) == (1.0, -0.5, 0.7071067811865476)
    assert meta["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["precision"] == "fp32" and meta["opset"] == 18 and meta["created_at"].endswith("+00:00")
    assert meta["features_name"] == FEATURES_NAME and meta["feature_dim"] == load_checkpoint(run)[0].feature_dim
    # expected l0 = P(X > 0) for X ~ GN_1(-0.5, 1/sqrt 2), from scipy's gennorm as the independent reference
    p, mu, sigma = 1.0, -0.5, 0.7071067811865476
    assert meta["expected_l0"] == pytest.approx(stats.gennorm.sf(0, p, loc=mu, scale=sigma * p ** (1 / p)), rel=1e-9)
    assert meta["model_config"]["backbone_kwargs"] == {"width": 0.125}
    assert meta["parity"]["passed"] is True and meta["parity"]["checks"][0]["precision"] == "fp32"
    assert meta_io.OOD_KEY not in meta
    # typed values survive encode -> metadata_props strings -> decode exactly
    assert meta_io.decode(meta_io.encode(meta)) == meta
    with pytest.raises(ValueError, match="not finite|Out of range"):
        meta_io.encode({"target_mu": float("nan")})


def test_ood_calibration_written_atomically_into_the_model(grey, tmp_path):
    _, out, _ = grey
    copy = tmp_path / "m.onnx"
    copy.write_bytes(out.read_bytes())
    assert meta_io.read_ood_calibration(copy) is None
    sidecar = meta_io.ood_sidecar(copy)
    sidecar.write_text(json.dumps({"source": "sidecar"}))
    assert meta_io.read_ood_calibration(copy) == {"source": "sidecar"}
    calibration = {"threshold": 0.125, "l0_quantiles": [0.01, 0.5, 0.99], "data": "fashion-mnist:train"}
    meta_io.write_ood_calibration(copy, calibration)
    assert meta_io.read_metadata(copy)[meta_io.OOD_KEY] == calibration
    assert meta_io.read_ood_calibration(copy) == calibration  # embedded wins over the sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", sidecar.name]  # no temp file left behind
    x = grey_batch(3).numpy()
    before = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]
    after = ort.InferenceSession(str(copy), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]
    np.testing.assert_array_equal(before, after)
    with pytest.raises(ValueError):
        meta_io.write_ood_calibration(copy, {"bad": float("inf")})
    assert meta_io.read_metadata(copy)[meta_io.OOD_KEY] == calibration  # a failed write changes nothing


@pytest.mark.parametrize(
    ("backbone", "kwargs", "size"),
    [
        ("vit", {"num_layers": 1, "hidden_dim": 32, "mlp_dim": 64, "num_heads": 2, "patch_size": 8}, 32),
        ("convnext", {"dims": [8, 16], "depths": [1, 1]}, 32),
        ("resnet50", {"width": 0.0625}, 32),
    ],
)
def test_each_backbone_family_exports_with_parity_on_colour_images(tmp_path, backbone, kwargs, size):
    torch.manual_seed(1)
    config = ModelConfig(
        backbone=backbone, backbone_kwargs=kwargs, projector_dims=[32, 48], image_size=size, in_channels=3
    )
    model = _calibrate_bn(build_model(config), _colour_batch(config))
    ckpt = save_checkpoint(tmp_path / "model.safetensors", model)
    # resnet50 takes the TorchScript exporter so that path stays covered too
    exporter = "torchscript" if backbone == "resnet50" else "dynamo"
    opset = 17 if backbone == "resnet50" else None  # the minimum opset, which only TorchScript can emit
    report = export_checkpoint(ckpt, tmp_path / "m.onnx", exporter=exporter, opset=opset, parity_images=60)
    assert report.passed, report.format()
    assert report.data == "samples:cifar10+cifar100+imagenet" and report.n_images == 60
    assert report.checks[0].max_abs_err <= FP32_MAX_ABS_ERR and report.checks[0].support_mismatches == 0
    meta = meta_io.read_metadata(tmp_path / "m.onnx")
    assert meta["dim"] == 48 and meta["in_channels"] == 3 and meta["backbone"] == backbone
    assert meta["exporter"] == exporter and meta["opset"] == (opset or 18)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [o.version for o in proto.opset_import if o.domain == ""] == [opset or 18]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_exports_stay_within_tolerance(grey, tmp_path, precision):
    run, _, _ = grey
    out = tmp_path / f"{precision}.onnx"
    report = export_checkpoint(
        run, out, precision=precision, parity_images=PARITY_IMAGES, calibration_images=64, exporter="torchscript"
    )
    assert [c.precision for c in report.checks] == ["fp32", precision]
    check = report.checks[1]
    max_drift, min_overlap = TOLERANCES[precision]
    assert check.passed and check.l0_drift <= max_drift and check.topk_overlap >= min_overlap
    assert check.max_abs_err > 1e-4  # it really is a different numeric format
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    if precision == "int8":
        assert ops.count("QuantizeLinear") >= 10 and "DequantizeLinear" in ops
        assert report.calibration == "fashion-mnist:train" and not report.calibration_overlaps_eval
        # the output projection stays float (excluded from quantization to keep l0 honest)
        assert ops[-2:] == ["Gemm", "Relu"]
    else:
        assert onnx.TensorProto.FLOAT16 in {t.data_type for t in proto.graph.initializer}
    meta = meta_io.read_metadata(out)
    assert meta["precision"] == precision and meta["parity"]["checks"][1]["precision"] == precision
    # the graph boundary stays float32 so callers never change
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"
    assert sess.run(None, {INPUT_NAME: grey_batch(7).numpy()})[0].shape == (7, 64)


def _int8_export(run: Path, out: Path, parity_images: int) -> list[str]:
    """`lpjepa export` of `run` at int8 with the quick TorchScript exporter and 32 calibration images."""
    return ["export", str(run), "--out", str(out), "--precision", "int8", "--exporter", "torchscript",
            "--parity-images", str(parity_images), "--calibration-images", "32"]  # fmt: skip


def test_int8_beyond_a_tightened_gate_fails_and_writes_nothing(grey, tmp_path, lpjepa):
    """A real int8 model of an untrained network keeps ~0.8 of the fp32 neighbours: demanding 0.99 must fail."""
    run, _, _ = grey
    out = tmp_path / "strict.onnx"
    with pytest.raises(ParityError, match="int8 parity failed: .*overlap") as info:
        export_checkpoint(
            run,
            out,
            precision="int8",
            parity_images=PARITY_IMAGES,
            calibration_images=64,
            exporter="torchscript",
            tolerance=(0.02, 0.99),
        )
    assert not out.exists() and not info.value.report.passed
    assert info.value.report.checks[0].passed  # fp32 was fine; the int8 gate is what failed
    code, stdout, err = lpjepa(*_int8_export(run, out, parity_images=32), "--min-overlap", "0.999")
    assert code == 2 and "FAIL" in stdout and "nothing was written" in err and not out.exists()


def test_parity_check_rejects_real_deviations():
    rng = np.random.default_rng(0)
    ref = np.maximum(rng.normal(-0.3, 1.0, (50, 32)), 0).astype(np.float32)
    assert compare(ref, ref.copy(), "fp32").passed
    noisy = ref + np.float32(3e-4) * (ref > 0)
    assert any("max abs error" in f for f in compare(ref, noisy, "fp32").failures)
    flipped = ref.copy()
    i, j = np.argwhere(ref > 1e-3)[0]
    flipped[i, j] = 0.0
    check = compare(ref, flipped, "fp32")
    assert check.support_mismatches == 1 and any("zero and non-zero" in f for f in check.failures)
    tiny = ref.copy()
    tiny[ref == 0] = 5e-6  # within the zero band: tolerated
    assert compare(ref, tiny, "fp32").support_mismatches == 0
    shuffled = ref[rng.permutation(50)]  # right vectors, wrong images
    bad = compare(ref, shuffled, "int8")
    assert not bad.passed and any("overlap" in f for f in bad.failures)
    dense = compare(ref, ref + 0.01, "fp16")
    assert any("l0 drift" in f for f in dense.failures)


def test_topk_overlap_matches_scipy_cosine_neighbours():
    from scipy.spatial.distance import cdist

    from export.parity import topk_neighbours, topk_overlap

    def scipy_topk(z: np.ndarray) -> list[set[int]]:
        dist = cdist(z, z, metric="cosine")
        np.fill_diagonal(dist, np.inf)
        return [set(np.argsort(row, kind="stable")[:10].tolist()) for row in dist]

    rng = np.random.default_rng(3)
    z = np.maximum(rng.normal(0, 1, (40, 16)), 0) + 1e-3
    expected = scipy_topk(z)
    ours = topk_neighbours(z, 10)
    assert np.mean([len(set(a.tolist()) & b) for a, b in zip(ours, expected, strict=True)]) >= 9.9
    w = z + rng.normal(0, 0.3, z.shape)
    manual = np.mean([len(a & b) for a, b in zip(expected, scipy_topk(w), strict=True)]) / 10
    assert 0.2 < manual < 0.95  # the perturbation really moves neighbours, so the comparison is informative
    assert topk_overlap(z, w) == pytest.approx(manual, abs=0.02)
    assert topk_overlap(z, z) == 1.0


# ------------------------------------------------------------------------------------------ CLI
def test_cli_exports_int8_and_writes_a_json_report(grey, tmp_path, lpjepa):
    run, _, _ = grey
    out, report_path = tmp_path / "cli.onnx", tmp_path / "parity.json"
    ood = tmp_path / "ood.json"
    ood.write_text(json.dumps({"mean_l0": 0.3}))
    code, stdout, _ = lpjepa(
        *_int8_export(run, out, parity_images=64), "--report", str(report_path), "--ood-calibration", str(ood)
    )
    assert code == 0, stdout
    assert "fp32" in stdout and "int8" in stdout and "top10" in stdout and f"wrote {out}" in stdout
    report = json.loads(report_path.read_text())
    assert report["passed"] and [c["precision"] for c in report["checks"]] == ["fp32", "int8"]
    assert meta_io.read_metadata(out)[meta_io.OOD_KEY] == {"mean_l0": 0.3}


def test_cli_bad_input_exits_2_with_a_message(grey, tmp_path, lpjepa):
    run, _, _ = grey
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 7 + b"not a checkpoint" * 10)
    cases = [
        (["export", str(tmp_path / "missing"), "--out", str(tmp_path / "a.onnx")], "no checkpoint"),
        (["export", str(corrupt), "--out", str(tmp_path / "a.onnx")], "not a readable safetensors"),
        (["export", str(run), "--out", str(tmp_path / "a.onnx"), "--precision", "int4"], "invalid choice"),
        (["export", str(run), "--out", str(tmp_path / "a.txt")], "must end in .onnx"),
        (["export", str(run), "--out", str(tmp_path / "a.onnx"), "--opset", "9"], "opset 9 is not supported"),
        (["export", str(run), "--out", str(tmp_path / "a.onnx"), "--opset", "17"], "needs opset >= 18"),
        (["export", str(run), "--out", str(tmp_path / "a.onnx"), "--parity-data", "nope:x"], "unknown data spec"),
        (["export", str(run), "--out", str(tmp_path / "a.engine"), "--format", "tensorrt"], "needs the `tensorrt`"),
        (["export", str(run), "--out", str(tmp_path / "a.onnx"), "--min-overlap", "0.5"], "fp16 or int8 only"),
    ]
    for argv, message in cases:
        code, _, err = lpjepa(*argv)
        assert code == 2, argv
        assert message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.onnx").exists()


def test_lpjepa_binary_reports_missing_checkpoint(tmp_path):
    exe = Path(sys.executable).with_name("lpjepa")
    proc = subprocess.run(
        [str(exe), "export", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no checkpoint at" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_is_an_export_error():
    with pytest.raises(ExportError, match="unknown data spec"):
        load_images("no-such-data", 1, 10, purpose="parity")
    files = sample_image_files("imagenet")
    assert len(files) == 20  # the colour parity images are really there
