"""OOD stage end to end on a tiny exported model: calibration through the model file, CLI, real and odd images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import export_tiny_model, tiny_config
from PIL import Image

from cli.main import main
from ood import calibrate_model
from ood.suite import ScoreSuite


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A randomly initialised ResNet-18 at width 0.125 exported to ONNX, plus a copy that stays uncalibrated."""
    root = tmp_path_factory.mktemp("ood_model")
    export_tiny_model(root, tiny_config(backbone_kwargs={"width": 0.125, "small_stem": True}, target_mu=0.0))
    (root / "plain").mkdir()
    shutil.copy(root / "model.onnx", root / "plain" / "model.onnx")
    return root / "model.onnx", root / "plain" / "model.onnx"


@pytest.fixture(scope="module")
def calibrated(exported):
    model, _ = exported
    cal = calibrate_model(model, "fashion-mnist", limit=600, shift_limit=200, progress=False)
    return model, cal


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """Images a user might drop in a folder: colour, large, tiny, alpha, 16-bit, palette, CMYK, and a broken one."""
    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8), "RGB").save(d / "colour_large.jpg")
    Image.fromarray(rng.integers(0, 255, (5, 5), dtype=np.uint8), "L").save(d / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 4), dtype=np.uint8), "RGBA").save(d / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)).save(d / "grey16.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), "RGB").convert("P").save(d / "palette.gif")
    Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8), "RGB").convert("CMYK").save(d / "cmyk.jpg")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (d / "notes.txt").write_text("not an image")
    return d


def test_calibration_round_trips_through_the_model_file(calibrated):
    from export.runtime import EmbeddingRuntime

    model, cal = calibrated
    runtime = EmbeddingRuntime(str(model))
    stored = runtime.ood_calibration
    assert stored is not None
    assert json.loads(json.dumps(stored)) == json.loads(json.dumps(cal))
    assert stored["version"] == 2 and stored["dim"] == runtime.dim == 64
    assert stored["feature_dim"] == runtime.feature_dim == 64  # width-0.125 ResNet-18 features
    assert set(stored["selection"]["validation_sets"]) == {f"shift:{s}" for s in ("noise", "blur", "invert", "rotate")}
    assert stored["source"]["spec"] == "fashion-mnist" and stored["n"] == 600
    # The stored scorer scores fresh in-distribution images exactly as the in-memory one does, and keeps TPR.
    from data.sources import open_source

    test = open_source("fashion-mnist:test")
    emb, feats = runtime.embed_with_features([test.image(i) for i in range(600)])
    a = ScoreSuite.from_calibration(stored).score(emb, feats)
    b = ScoreSuite.from_calibration(cal).score(emb, feats)
    np.testing.assert_array_equal(a.score, b.score)
    assert a.score_name == cal["served"]
    # 95% target: sd ~0.009 from 600 fresh images plus ~0.012 from the 300-image held-out quantile
    assert 0.90 <= 1.0 - a.is_ood.mean() <= 0.995


def test_cli_calibrate_then_score_odd_images(exported, odd_folder, lpjepa, tmp_path):
    _, plain = exported
    model = tmp_path / "m.onnx"
    shutil.copy(plain, model)
    code, out, err = lpjepa(
        "ood",
        "calibrate",
        "--model",
        str(model),
        "--data",
        "fashion-mnist:test",
        "--limit",
        "200",
        "--validate-ood",
        "mnist",
        "--validate-ood",
        "samples:cifar10",
        "--validate-limit",
        "100",
        "--shift-limit",
        "60",
        "--json",
        "--no-progress",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n"] == 200 and summary["dim"] == 64 and summary["holdout_tpr"] >= 0.95
    sets = {"mnist", "samples:cifar10", "shift:noise", "shift:blur", "shift:invert", "shift:rotate"}
    assert set(summary["validation_sets"]) == sets
    assert {(r["score"], r["set"]) for r in summary["table"]} == {(n, st) for n in summary["scores"] for st in sets}
    best = max(v["min_auroc"] for v in summary["summary"].values())
    assert summary["summary"][summary["served"]]["min_auroc"] >= best - 0.005
    assert summary["served"] in summary["reason"] and summary["drift_window"] == 64

    code, out, err = lpjepa("ood", "score", "--model", str(model), str(odd_folder), "--json", "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    names = sorted(r["path"].rsplit("/", 1)[-1] for r in report["results"])
    assert names == ["alpha.png", "cmyk.jpg", "colour_large.jpg", "grey16.png", "palette.gif", "tiny.png"]
    assert [f["path"].rsplit("/", 1)[-1] for f in report["failed"]] == ["broken.png"]
    assert report["score_name"] == summary["served"] and report["threshold"] == summary["threshold"]
    for r in report["results"]:
        assert np.isfinite(r["score"]) and 0.0 <= r["l0"] <= 1.0 and isinstance(r["is_ood"], bool)
        assert r["is_ood"] == (r["score"] > report["threshold"]) and r["score_name"] == summary["served"]

    code, out, err = lpjepa("ood", "score", "--model", str(model), str(odd_folder / "tiny.png"), "--no-progress")
    assert code == 0 and "tiny.png" in out and "flagged out-of-distribution" in out


def test_cli_eval_json_fields(calibrated, lpjepa, tmp_path):
    model, _ = calibrated
    out_file = tmp_path / "eval.json"
    code, out, err = lpjepa(
        "ood",
        "eval",
        "--model",
        str(model),
        "--id",
        "fashion-mnist:test",
        "--ood",
        "mnist",
        "--limit",
        "150",
        "--train-limit",
        "200",
        "--json",
        "--no-progress",
        "--out",
        str(out_file),
    )
    assert code == 0, err
    rep = json.loads(out)
    assert json.loads(out_file.read_text()) == rep
    _, cal = calibrated
    assert set(rep["methods"]) == {*cal["scores"], "knn", "mahalanobis"} and "feature_mahalanobis" in rep["methods"]
    assert rep["served"] == cal["served"] and rep["methods"][cal["served"]]["served"] is True
    assert rep["operating_point"]["score"] == cal["served"]
    for m in rep["methods"].values():
        assert {"auroc", "fpr95", "aupr", "aupr_in", "score_us", "needs"} <= set(m)
        assert 0.0 <= m["auroc"] <= 1.0
    assert rep["id"] == {"spec": "fashion-mnist:test", "n": 150, "failed": 0}
    assert rep["ood"]["n"] == 150 and rep["train"]["spec"] == "fashion-mnist:train" and rep["train"]["n"] == 200
    assert rep["calibration"]["from"] == "model"
    assert rep["methods"]["knn"]["k"] == 50
    assert rep["l0"]["expected"] == pytest.approx(0.5, abs=1e-6)  # p=1, mu=0: half the dimensions fire


def test_cli_eval_on_image_folders_splits_the_id_folder(exported, odd_folder, lpjepa, tmp_path):
    """A folder ID spec has no train split: half is used to fit, the other half evaluated; no calibration stored
    in the plain model, so the scores are calibrated at eval time on that half."""
    _, plain = exported
    from data.sources import open_source

    id_dir = tmp_path / "id"
    (id_dir / "a").mkdir(parents=True)
    (id_dir / "b").mkdir()
    src = open_source("fashion-mnist:test")
    for i in range(120):
        src.image(i).save(id_dir / ("a" if i % 2 else "b") / f"{i}.png")
    code, out, err = lpjepa(
        "ood",
        "eval",
        "--model",
        str(plain),
        "--id",
        str(id_dir),
        "--ood",
        str(odd_folder),
        "--json",
        "--no-progress",
    )
    assert code == 0, err
    rep = json.loads(out)
    assert (
        rep["id"]["n"] == 60
        and rep["train"]["n"] == 60
        and rep["ood"] == {"spec": str(odd_folder), "n": 6, "failed": 1}
    )
    assert rep["calibration"]["from"].startswith("fitted at eval time")
    assert rep["methods"]["knn"]["k"] == 50

    code, out, err = lpjepa(
        "ood", "eval", "--model", str(plain), "--id", str(id_dir), "--ood", str(odd_folder), "--no-progress"
    )
    assert code == 0, err
    assert "AUROC" in out and "knn" in out and "mahalanobis" in out and "batch size" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ood", "score", "--model", "/nonexistent/m.onnx", "."], "no model at /nonexistent/m.onnx"),
        (["ood", "calibrate", "--model", "/nonexistent/m.onnx", "--data", "mnist"], "no model at"),
        (["ood", "eval", "--model", "MODEL", "--id", "no-such-set", "--ood", "mnist"], "unknown data spec"),
        (["ood", "calibrate", "--model", "MODEL", "--data", "fashion-mnist:val"], "splits train and test"),
        (["ood", "score", "--model", "PLAIN", "TINY"], "has no OOD calibration"),
        (["ood", "score", "--model", "MODEL", "/nonexistent/img.png"], "no such file or folder"),
        (["ood", "calibrate", "--model", "MODEL", "--data", "mnist", "--validate-ood", "nope"], "unknown data spec"),
    ],
)
def test_cli_errors_are_one_line_exit_2(exported, odd_folder, lpjepa, argv, message):
    model, plain = exported
    subst = {"MODEL": str(model), "PLAIN": str(plain), "TINY": str(odd_folder / "tiny.png")}
    code, out, err = lpjepa(*[subst.get(a, a) for a in argv], "--no-progress")
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ood", "calibrate", "--model", "m.onnx", "--data", "mnist", "--tpr", "1.5"])
    assert exc.value.code == 2
    assert "--tpr" in capsys.readouterr().err


def test_cli_score_with_a_foreign_calibration_is_a_clear_error(exported, odd_folder, lpjepa, tmp_path):
    from export.metadata import write_ood_calibration

    _, plain = exported
    model = tmp_path / "m.onnx"
    shutil.copy(plain, model)
    write_ood_calibration(model, {"version": 99, "dim": 64})
    code, _, err = lpjepa("ood", "score", "--model", str(model), str(odd_folder / "tiny.png"))
    assert code == 2 and "calibration version 99 is not supported" in err and err.count("\n") == 1


def test_model_without_feature_output(exported, tmp_path):
    """--no-features: the graph has one output, calibration fits no feature score, and a server refuses a
    calibration that serves one (instead of failing on the first request)."""
    from export.onnx_export import export_checkpoint
    from export.runtime import EmbeddingRuntime
    from serve.embedding import load_scorer

    model, _ = exported
    out = tmp_path / "nofeat.onnx"
    export_checkpoint(str(model.parent / "model.safetensors"), str(out), parity=False, features=False)
    runtime = EmbeddingRuntime(str(out))
    assert runtime.feature_dim is None
    with pytest.raises(ValueError, match="no encoder-feature output"):
        runtime.run_with_features(np.zeros((1, 1, 28, 28), dtype=np.float32))
    cal = calibrate_model(out, "fashion-mnist", limit=120, shift_limit=40, progress=False, write=False)
    assert "feature_mahalanobis" not in cal["scores"] and cal["feature_dim"] is None
    with_feats = EmbeddingRuntime(str(model))
    emb, feats = with_feats.run_with_features(np.zeros((3, 1, 28, 28), dtype=np.float32))
    np.testing.assert_array_equal(emb, with_feats.run(np.zeros((3, 1, 28, 28), dtype=np.float32)))
    assert feats.shape == (3, with_feats.feature_dim)

    from export.metadata import write_ood_calibration

    full = calibrate_model(model, "fashion-mnist", limit=120, shift_limit=40, progress=False, write=False)
    write_ood_calibration(out, {**full, "served": "feature_mahalanobis"})
    with pytest.raises(ValueError, match="needs the encoder features"):
        load_scorer(EmbeddingRuntime(str(out)))
