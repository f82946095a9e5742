"""The metadata_props of an export: files written by the exporter before its pydantic model still load to the same
typed values, encoding writes the same strings, and bad values are reported with the key and the file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export import metadata as meta_io
from export.runtime import EmbeddingRuntime, ModelLoadError

# metadata_props exactly as the exporter of commit cff5359 (the hand-written SCHEMA dict) wrote them
OLD_PROPS = {
    "backbone": "resnet",
    "checkpoint_name": "model.safetensors",
    "checkpoint_sha256": "ab" * 32,
    "created_at": "2026-12-03T10:00:00+00:00",
    "dim": "784",
    "expected_l0": "null",
    "exporter": "dynamo",
    "feature_dim": "32",
    "features_name": '"features"',
    "format": "lpjepa-onnx/1",
    "image_size": "28",
    "in_channels": "1",
    "input_name": "images",
    "mean": "[0.286]",
    "method": "rectified_lpjepa",
    "model_config": '{"backbone": "resnet", "backbone_kwargs": {"width": 0.125}, "embed_dim": 784}',
    "ood_calibration": '{"q": [0.1, 0.9], "threshold": 0.125}',
    "opset": "18",
    "output_name": "embedding",
    "parity": '{"checks": [{"max_abs_err": 1e-07, "precision": "fp32"}], "passed": true}',
    "precision": "int8",
    "rectify": "true",
    "someone_elses": "free text, not JSON",
    "std": "[0.353]",
    "target_mu": "-0.5",
    "target_p": "1.0",
    "target_sigma": "0.7071067811865476",
    "tensorrt_profile": '{"max": 256, "min": 1, "opt": 32}',
}


def _old_export(path, props=OLD_PROPS):
    """A graph with the serving contract (images (N,1,28,28) -> embedding (N,784): relu of the pixels) and `props`."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["images"], ["flat"], axis=1),
            helper.make_node("Relu", ["flat"], ["embedding"]),
        ],
        "old",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 784])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_old_props_decode_to_typed_values_and_encode_back_to_the_same_strings():
    meta = meta_io.decode(OLD_PROPS)
    assert meta["dim"] == 784 and isinstance(meta["dim"], int)
    assert meta["target_p"] == 1.0 and isinstance(meta["target_p"], float) and meta["expected_l0"] is None
    assert meta["mean"] == [0.286] and meta["rectify"] is True and meta["features_name"] == "features"
    assert meta["model_config"]["backbone_kwargs"] == {"width": 0.125} and meta["tensorrt_profile"]["max"] == 256
    assert meta["someone_elses"] == "free text, not JSON"  # a foreign key that is not JSON stays text
    assert list(meta) == list(OLD_PROPS)  # same keys, same order
    encoded = meta_io.encode(meta)
    assert {k: v for k, v in encoded.items() if k != "someone_elses"} == {
        k: v for k, v in OLD_PROPS.items() if k != "someone_elses"
    }
    assert json.loads(encoded["someone_elses"]) == OLD_PROPS["someone_elses"]
    assert meta_io.encode({"target_p": 1}) == {"target_p": "1.0"}  # floats stay floats in the file


def test_an_old_export_loads_and_runs(tmp_path):
    path = _old_export(tmp_path / "old.onnx")
    meta = meta_io.read_metadata(path)
    assert meta == meta_io.decode(OLD_PROPS)
    rt = EmbeddingRuntime(path, providers=["CPUExecutionProvider"])
    assert (
        rt.dim == 784 and rt.input_shape == (1, 28, 28) and rt.ood_calibration == {"q": [0.1, 0.9], "threshold": 0.125}
    )
    x = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(rt.run(x), np.maximum(x.reshape(3, -1), 0))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dim", '"sixty-four"', "metadata key 'dim': Input should be a valid integer"),
        ("mean", '["a"]', "metadata key 'mean.0': Input should be a valid number"),
        ("rectify", '"perhaps"', "metadata key 'rectify': Input should be a valid boolean"),
        ("opset", "{not json", "metadata key 'opset' holds invalid JSON"),
        ("target_mu", "null", "metadata key 'target_mu'"),  # only expected_l0 may be null
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path, key, value, message):
    path = _old_export(tmp_path / "bad.onnx", {**OLD_PROPS, key: value})
    for load in (meta_io.read_metadata, EmbeddingRuntime):
        with pytest.raises(ModelLoadError, match=message) as info:
            load(path)
        assert str(path) in str(info.value)


def test_missing_keys_and_bad_values_to_encode_are_refused(tmp_path):
    props = {k: v for k, v in OLD_PROPS.items() if k not in ("dim", "std")}
    with pytest.raises(ModelLoadError, match="lacks metadata keys: dim, std"):
        meta_io.read_metadata(_old_export(tmp_path / "partial.onnx", props))
    with pytest.raises(ValueError, match="metadata key 'precision'"):
        meta_io.encode({"precision": 16})  # strings are stored raw, so a number would not read back
    with pytest.raises(ValueError, match="metadata key 'dim'"):
        meta_io.encode({"dim": None})
