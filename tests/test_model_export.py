"""TF-Hub export: hub.KerasLayer gives the in-memory model's outputs and fine-tunes; the CLI around it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras
from model_fixtures import random_head_classifier

from bitray.cli import main
from bitray.errors import BitrayError
from bitray.model import LoadedModel, load_model
from bitray.model.bit import fold_weight_standardization
from bitray.model.export import export_savedmodel
from bitray.model.weights import features_model, save_npz

IMAGES = np.random.default_rng(0).random((4, 48, 48, 3), np.float32)


@pytest.fixture(scope="module")
def classifier() -> LoadedModel:
    loaded = random_head_classifier(3)
    loaded.class_names = ["cat", "dog", "owl"]
    loaded.image_size = 48
    return loaded


@pytest.fixture(scope="module")
def exports(classifier: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {
        "features": export_savedmodel(classifier, root / "features"),
        "classifier": export_savedmodel(classifier, root / "classifier", classifier=True),
    }


def test_hub_layer_gives_the_same_features(classifier: LoadedModel, exports: dict[str, Path]) -> None:
    expected = features_model(classifier)(IMAGES).numpy()
    features = hub.KerasLayer(str(exports["features"]))(IMAGES).numpy()
    assert features.shape == (4, 1024)
    module = tf.saved_model.load(str(exports["features"]))  # the plain TF2 API sees the same module
    assert np.abs(module(IMAGES).numpy() - expected).max() < 1e-4
    served = module.signatures["serving_default"](images=tf.constant(IMAGES))["features"]
    assert np.abs(served.numpy() - expected).max() < 1e-4
    assert np.abs(features - expected).max() < 1e-4
    other_size = np.random.default_rng(2).random((2, 64, 40, 3), np.float32)  # any size from 32 px
    assert (
        np.abs(
            hub.KerasLayer(str(exports["features"]))(other_size).numpy()
            - features_model(classifier)(other_size).numpy()
        ).max()
        < 1e-4
    )


def test_classifier_export_gives_the_same_logits(classifier: LoadedModel, exports: dict[str, Path]) -> None:
    logits = hub.KerasLayer(str(exports["classifier"]))(IMAGES).numpy()
    assert logits.shape == (4, 3)
    assert np.abs(logits - classifier.model(IMAGES).numpy()).max() < 1e-4
    assert np.abs(logits).max() > 1e-3  # the head's weights were exported, not zeros


def test_fine_tuning_through_the_hub_layer_changes_its_variables(exports: dict[str, Path]) -> None:
    small = IMAGES[:, :32, :32]
    frozen = hub.KerasLayer(str(exports["features"]))
    assert frozen.trainable_weights == [] and len(frozen.non_trainable_weights) == 43

    layer = hub.KerasLayer(str(exports["features"]), trainable=True)
    model = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), layer, tf_keras.layers.Dense(2)])
    assert len(layer.trainable_weights) == 43  # every conv kernel, GN gamma and beta of tiny
    before = [w.numpy().copy() for w in layer.trainable_weights]
    model.compile(
        tf_keras.optimizers.SGD(0.05), tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(small, np.array([0, 1, 0, 1]), epochs=1, batch_size=4, verbose=0)
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, layer.trainable_weights, strict=True)]
    assert all(changed)


def test_savedmodel_spec_loads_the_export_back(classifier: LoadedModel, exports: dict[str, Path]) -> None:
    loaded = load_model(f"savedmodel:{exports['features']}")
    assert (loaded.model_id, loaded.arch, loaded.feature_dim) == ("bit-tiny@random-init", "tiny", 1024)
    expected = features_model(classifier)(IMAGES).numpy()
    assert np.abs(loaded.model(IMAGES).numpy() - expected).max() < 1e-4
    logits = load_model(str(exports["classifier"]), num_classes=3)  # a bare SavedModel dir works too
    assert np.abs(logits.model(IMAGES).numpy() - classifier.model(IMAGES).numpy()).max() < 1e-4
    with pytest.raises(BitrayError, match=r"classifier with 3 classes and gives no features"):
        load_model(f"savedmodel:{exports['classifier']}")


def test_export_to_and_load_from_s3(classifier: LoadedModel, s3_bucket: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BITRAY_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{s3_bucket}/modules/bit-tiny"
    assert export_savedmodel(classifier, uri) == uri
    loaded = load_model(f"savedmodel:{uri}")
    assert loaded.model_id == "bit-tiny@random-init"
    expected = features_model(classifier)(IMAGES).numpy()
    assert np.abs(loaded.model(IMAGES).numpy() - expected).max() < 1e-4
    with pytest.raises(BitrayError, match=r"already exists"):
        export_savedmodel(classifier, uri)


def test_hub_handle_from_an_offline_cache(exports: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    handle = "https://tfhub.dev/google/bit/s-r101x1/1"
    # tensorflow_hub caches a handle under sha1(handle); a machine without network can be given a copy
    shutil.copytree(exports["features"], tmp_path / hashlib.sha1(handle.encode()).hexdigest())
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    loaded = load_model("bit-s-r101x1")
    assert loaded.model_id == "bit-s-r101x1@tfhub"
    assert loaded.model(IMAGES).shape == (4, 1024)
    assert load_model(f"hub:{handle}").model_id == "bit-s-r101x1@tfhub"


def test_export_refuses_to_overwrite_and_needs_a_head(
    classifier: LoadedModel, exports: dict[str, Path]
) -> None:
    before = sorted(p.name for p in exports["features"].iterdir())
    with pytest.raises(BitrayError, match=r"already exists; choose a new --output"):
        export_savedmodel(classifier, exports["features"])
    assert sorted(p.name for p in exports["features"].iterdir()) == before
    with pytest.raises(BitrayError, match=r"needs a model with a head: pass --num-classes"):
        export_savedmodel(
            load_model("random:tiny", trainable=True), exports["features"].parent / "new", classifier=True
        )
    folded = load_model("random:tiny")
    fold_weight_standardization(folded.model)
    with pytest.raises(BitrayError, match=r"folded into the kernels"):
        export_savedmodel(folded, exports["features"].parent / "new")


def test_cli_model_info(capsys: pytest.CaptureFixture) -> None:
    assert main(["model", "info", "random:tiny", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "variant:      tiny (units 1-1-1-1, width x0.5)" in out
    assert f"parameters:   {load_model('random:tiny', num_classes=10).model.count_params():,}" in out
    assert "feature size: 1024" in out
    assert "head:         10 classes" in out
    assert "weights:      bit-tiny@random-init" in out


def test_cli_model_export_from_npz(classifier: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture):
    checkpoint = tmp_path / "BiT-tiny.npz"
    save_npz(classifier.model, str(checkpoint))
    output = tmp_path / "module"
    argv = ["model", "export", "--arch", "tiny", "--weights", str(checkpoint), "--output", str(output)]
    assert main([*argv, "--classifier", "--num-classes", "3"]) == 0
    assert "hub.KerasLayer" in capsys.readouterr().out
    logits = hub.KerasLayer(str(output))(IMAGES).numpy()
    assert np.abs(logits - classifier.model(IMAGES).numpy()).max() < 1e-4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["model", "info", "npz:/no/such/BiT-S-R50x1.npz"], "'/no/such/BiT-S-R50x1.npz' does not exist"),
        (["model", "info", "random:r34x1"], "unknown BiT architecture 'r34x1'"),
        (
            ["model", "export", "--weights", "random:tiny", "--output", "x", "--classifier"],
            "needs --num-classes",
        ),
        (["model", "export", "--weights", "random:tiny", "--arch", "R50x1", "--output", "x"], "not R50x1"),
    ],
)
def test_cli_errors_are_messages(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitray: error: ") and message in err
    assert "Traceback" not in err


def test_exports_carry_their_class_names(classifier: LoadedModel, exports: dict[str, Path]) -> None:
    directory = exports["classifier"]
    assert (directory / "assets" / "labels.txt").read_text() == "cat\ndog\nowl\n"
    module = tf.saved_model.load(str(directory))
    assert [n.decode() for n in module.class_names()["class_names"].numpy()] == ["cat", "dog", "owl"]
    signature = module.signatures["class_names"]()["class_names"].numpy()
    assert [n.decode() for n in signature] == ["cat", "dog", "owl"]
    served = module.signatures["serving_default"](images=tf.constant(IMAGES))
    np.testing.assert_allclose(served["probabilities"].numpy(), tf.nn.softmax(served["logits"]).numpy())
    loaded = load_model(f"savedmodel:{directory}", classifier=True)  # no class count to know beforehand
    assert loaded.class_names == ["cat", "dog", "owl"] and loaded.num_classes == 3
    assert loaded.image_size == 48
    np.testing.assert_allclose(loaded.model(IMAGES).numpy(), classifier.model(IMAGES).numpy(), atol=1e-4)
    assert load_model(f"savedmodel:{exports['features']}").class_names == ["cat", "dog", "owl"]
    with pytest.raises(BitrayError, match=r"not a classifier export"):
        load_model(f"savedmodel:{exports['features']}", classifier=True)


def test_exports_are_portable_and_convert_to_tflite(classifier: LoadedModel, exports: dict[str, Path]):
    for directory in exports.values():  # no function the runtime must hand to XLA
        assert b"_XlaMustCompile" not in (directory / "saved_model.pb").read_bytes()
    images = IMAGES[:2, :32, :32]
    converter = tf.lite.TFLiteConverter.from_saved_model(str(exports["classifier"]), ["serving_default"])
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], images.shape)
    interpreter.allocate_tensors()
    outputs = interpreter.get_signature_runner("serving_default")(images=images)
    np.testing.assert_allclose(outputs["logits"], classifier.model(images).numpy(), atol=1e-4)
