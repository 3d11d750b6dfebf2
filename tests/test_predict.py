"""`bitray predict`: a classifier that knows its classes, run over images by the embedding pipeline's
machinery (real local Ray), into exactly-once Parquet of labels, scores and top-k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from embed_fixtures import SIZE, snapshot, write_photos
from model_fixtures import random_head_classifier

from bitray.cli import main

pytestmark = pytest.mark.slow

CLASSES = ["cat", "dog", "fish"]


def test_predict_writes_labels_scores_and_top_k(ray_local, tmp_path, capsys):
    import tensorflow as tf

    from bitray.images import decode_image, resize_for_model
    from bitray.model import load_model
    from bitray.model.export import export_savedmodel

    loaded = random_head_classifier(len(CLASSES))
    loaded.class_names, loaded.image_size = CLASSES, SIZE
    export_savedmodel(loaded, tmp_path / "classifier", classifier=True)
    src, out = tmp_path / "in", tmp_path / "out"
    photos = write_photos(src, 10)
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    command = ["predict", "--model", f"savedmodel:{tmp_path / 'classifier'}", "--input", str(src),
               "--output", str(out), "--top-k", "2", "--run-id", "p1"]  # fmt: skip
    assert main(command) == 0
    assert f"predictions in {out}/predictions/" in capsys.readouterr().out

    predictions = pd.read_parquet(out / "predictions")
    errors = pd.read_parquet(out / "errors")
    assert sorted(predictions.path) == sorted(str(p) for p in photos)
    assert list(errors.path) == [str(src / "broken.jpg")] and list(errors.stage) == ["decode"]
    model = load_model(f"savedmodel:{tmp_path / 'classifier'}", classifier=True)
    assert model.class_names == CLASSES and model.image_size == SIZE  # the size predict used by default
    for row in predictions.itertuples():
        pixels = resize_for_model(decode_image(Path(row.path).read_bytes()).pixels, (SIZE, SIZE))
        probabilities = tf.nn.softmax(model.model(pixels[None])).numpy()[0]
        best = np.argsort(-probabilities, kind="stable")[:2]
        assert row.label == CLASSES[best[0]] and list(row.top_k_labels) == [CLASSES[i] for i in best]
        np.testing.assert_allclose(row.score, probabilities[best[0]], atol=1e-5)
        np.testing.assert_allclose(list(row.top_k_scores), probabilities[best], atol=1e-5)
    assert set(predictions.model) == {model.model_id} and set(predictions.run_id) == {"p1"}

    before = snapshot(out)  # a finished run, run again: nothing changes
    assert main(command) == 0
    assert snapshot(out) == before


def test_predict_refuses_a_model_without_a_head(ray_local, tmp_path, capsys):
    write_photos(tmp_path / "in", 2)
    command = ["predict", "--model", "random:tiny", "--input", str(tmp_path / "in"), "--output",
               str(tmp_path / "out"), "--image-size", str(SIZE)]  # fmt: skip
    assert main(command) == 2
    assert "has no classifier head" in capsys.readouterr().err
