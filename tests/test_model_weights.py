"""Loading weights: .npz round trip (local and S3), head handling, model ids, and every bad-weights case."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import random_head_classifier

from bitray.errors import BitrayError
from bitray.model import LoadedModel, load_model
from bitray.model.bit import fold_weight_standardization, named_weights
from bitray.model.weights import features_model, save_npz

IMAGES = np.random.default_rng(0).random((3, 40, 40, 3), np.float32)


@pytest.fixture(scope="module")
def classifier() -> LoadedModel:
    return random_head_classifier(5)


@pytest.fixture(scope="module")
def checkpoint(classifier: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("npz") / "BiT-tiny-test.npz"
    save_npz(classifier.model, str(path))
    return path


def test_random_model_ids_never_look_real() -> None:
    loaded = load_model("random:tiny")
    assert loaded.model_id == "bit-tiny@random-init"
    assert (loaded.arch, loaded.feature_dim, loaded.num_classes) == ("tiny", 1024, None)
    assert loaded.model(IMAGES).shape == (3, 1024)


def test_npz_uses_the_official_key_layout(checkpoint: Path) -> None:
    with np.load(checkpoint) as data:
        keys = set(data.files)
        assert data["resnet/head/conv2d/kernel"].shape == (1, 1, 1024, 5)
        assert data["resnet/root_block/standardized_conv2d/kernel"].shape == (7, 7, 3, 32)
    assert "resnet/block1/unit01/a/proj/standardized_conv2d/kernel" in keys
    assert {"resnet/group_norm/gamma", "resnet/group_norm/beta", "resnet/head/conv2d/bias"} <= keys


def test_npz_round_trip_gives_identical_outputs(classifier: LoadedModel, checkpoint: Path) -> None:
    logits = load_model(f"npz:{checkpoint}", num_classes=5, trainable=True)
    assert logits.model_id == "bit-tiny@npz:BiT-tiny-test.npz"
    assert logits.arch == "tiny"
    np.testing.assert_array_equal(logits.model(IMAGES).numpy(), classifier.model(IMAGES).numpy())
    for key, value in named_weights(logits.model).items():  # the raw weights, not standardized ones
        np.testing.assert_array_equal(value.numpy(), named_weights(classifier.model)[key].numpy())

    features = load_model(str(checkpoint))  # a bare .npz path is an npz: spec
    expected = features_model(classifier)(IMAGES).numpy()
    np.testing.assert_array_equal(features.model(IMAGES).numpy(), expected)
    fold_weight_standardization(features.model)  # inference only: raw weights are gone
    np.testing.assert_allclose(features.model(IMAGES).numpy(), expected, atol=1e-4)
    with pytest.raises(BitrayError, match=r"folded into the kernels \(inference only\)"):
        save_npz(features.model, str(checkpoint.parent / "again.npz"))


def test_head_with_other_class_count_starts_at_zero(
    checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        loaded = load_model(f"npz:{checkpoint}", num_classes=3)
    assert "5-class head" in caplog.text and "3-class head starts at zero" in caplog.text
    assert not np.any(loaded.model(IMAGES).numpy())


def test_npz_from_s3(
    classifier: LoadedModel, s3_server: str, s3_bucket: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("BITRAY_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{s3_bucket}/models/BiT-tiny-test.npz"
    save_npz(classifier.model, uri)
    loaded = load_model(f"npz:{uri}", num_classes=5, trainable=True)
    assert loaded.model_id == "bit-tiny@npz:BiT-tiny-test.npz"
    np.testing.assert_array_equal(loaded.model(IMAGES).numpy(), classifier.model(IMAGES).numpy())
    with pytest.raises(BitrayError, match=r"does not exist"):
        load_model(f"npz:s3://{s3_bucket}/models/missing.npz")


def _edited(checkpoint: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    with np.load(checkpoint) as data:
        arrays = {k: data[k] for k in data.files}
    edit(arrays)
    out = tmp_path / "edited.npz"
    np.savez(out, **arrays)
    return out


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BitrayError, match=r"nothing-here\.npz' does not exist; check the path"):
        load_model(f"npz:{tmp_path}/nothing-here.npz")


def test_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("these are not weights")
    with pytest.raises(BitrayError, match=r"notes\.npz is not a BiT checkpoint \(cannot read it as \.npz"):
        load_model(f"npz:{text}")
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(
        BitrayError, match=r"other\.npz is not a BiT checkpoint: it has no 'resnet/\.\.\.' keys"
    ):
        load_model(f"npz:{other}")


def test_wrong_variant_for_the_file(checkpoint: Path) -> None:
    with pytest.raises(BitrayError) as err:
        load_model(f"npz:{checkpoint}", arch="R50x1")
    message = str(err.value)
    assert "does not fit BiT r50x1" in message
    assert (
        "resnet/root_block/standardized_conv2d/kernel has shape (7, 7, 3, 32), r50x1 needs (7, 7, 3, 64)"
        in message
    )
    assert "this file holds a BiT tiny: use --arch tiny" in message


def test_damaged_shape(checkpoint: Path, tmp_path: Path) -> None:
    key = "resnet/block2/unit01/b/standardized_conv2d/kernel"

    def shrink(arrays: dict) -> None:
        arrays[key] = arrays[key][..., :32]

    with pytest.raises(BitrayError, match=rf"{key} has shape \(3, 3, 64, 32\), tiny needs \(3, 3, 64, 64\)"):
        load_model(f"npz:{_edited(checkpoint, tmp_path, shrink)}", arch="tiny")


def test_missing_keys(checkpoint: Path, tmp_path: Path) -> None:
    key = "resnet/block3/unit01/c/group_norm/gamma"
    path = _edited(checkpoint, tmp_path, lambda arrays: arrays.pop(key))
    with pytest.raises(BitrayError, match=rf"lacks 1 of the 43 keys BiT tiny needs \(first: {key}\)"):
        load_model(f"npz:{path}", arch="tiny")

    def drop_block4(arrays: dict) -> None:
        for k in [k for k in arrays if k.startswith("resnet/block4/")]:
            del arrays[k]

    with pytest.raises(BitrayError, match=r"does not match any BiT variant .*pass --arch"):
        load_model(f"npz:{_edited(checkpoint, tmp_path, drop_block4)}")


def test_unreachable_hub_handle(monkeypatch, tmp_path: Path) -> None:
    # an empty cache and a proxy that refuses connections: no network, whatever machine runs this
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(BitrayError) as err:
        load_model("bit-s-r101x1")
    message = str(err.value)
    assert message.startswith("cannot fetch TF-Hub module 'https://tfhub.dev/google/bit/s-r101x1/1'")
    assert "npz:" in message and "savedmodel:" in message and "TFHUB_CACHE_DIR" in message


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(BitrayError, match=r"unknown model spec 'resnet50'; use bit-s-r101x1"):
        load_model("resnet50")
    with pytest.raises(BitrayError, match=r"unknown BiT architecture 'r18x1'"):
        load_model("random:r18x1")
    with pytest.raises(BitrayError, match=r"is not a SavedModel directory"):
        load_model(f"savedmodel:{tmp_path}")
    with pytest.raises(BitrayError, match=r"holds a BiT tiny model, not r50x1"):
        load_model("random:tiny", arch="r50x1")


def test_registered_model_that_does_not_exist(mlflow_tracking_uri: str) -> None:
    with pytest.raises(BitrayError, match=r"cannot fetch 'models:/no-such-model@champion' from MLflow"):
        load_model("models:/no-such-model@champion")
