"""The fine-tune's evaluation report and promotion on merit (no Ray: numbers and a real MLflow registry)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitray.finetune import evaluation, promotion
from bitray.finetune.data import LabelledSet


def _set(tmp_path: Path, per_class: int = 4) -> LabelledSet:
    paths, labels = [], []
    for c, name in enumerate(["cat", "dog", "owl"]):
        for i in range(per_class):
            path = tmp_path / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 20, 3), 60 * c + 10 * i, np.uint8)).save(path)
            paths.append(str(path))
            labels.append(c)
    return LabelledSet(paths, labels, ["cat", "dog", "owl"])


def test_evaluation_agrees_with_a_direct_computation(tmp_path):
    val = _set(tmp_path / "val")
    rng = np.random.default_rng(0)
    table = rng.standard_normal((len(val), 3)).astype(np.float32) * 3

    def infer(images: np.ndarray) -> np.ndarray:  # a "model" that looks its logits up by pixel value
        keys = np.round(images[:, 0, 0, 0] * 255).astype(int)
        index = {int(round(60 * c + 10 * i)): 4 * c + i for c in range(3) for i in range(4)}
        return table[[index[k] for k in keys]]

    report = evaluation.evaluate(infer, val, 16)
    assert report.paths == val.paths and report.digest == val.digest()
    labels = np.array(val.labels)
    predicted = table.argmax(1)
    log_softmax = table - np.log(np.exp(table).sum(1, keepdims=True))
    assert report.loss() == pytest.approx(-log_softmax[np.arange(len(labels)), labels].mean(), rel=1e-5)
    assert report.top_k(1) == pytest.approx(np.mean(predicted == labels))
    assert report.top_k(5) == 1.0  # three classes: the truth is always among the top 5
    top2 = np.argsort(-table, 1)[:, :2]
    assert report.top_k(2) == pytest.approx(np.mean([labels[i] in top2[i] for i in range(len(labels))]))

    files = evaluation.write_artifacts(report, tmp_path / "out", 16)
    names = sorted(f.name for f in files)
    assert names == sorted(
        ["metrics.json", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "mistakes.png"]
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval/top1"] == pytest.approx(report.top_k(1)) and metrics["val_digest"] == val.digest()
    rows = list(csv.reader((tmp_path / "out" / "confusion_matrix.csv").open()))
    matrix = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    expected = np.zeros((3, 3), int)
    for t, p in zip(labels, predicted, strict=True):
        expected[t, p] += 1
    assert rows[0][1:] == ["cat", "dog", "owl"] and (matrix == expected).all()
    per_class = list(csv.DictReader((tmp_path / "out" / "per_class.csv").open()))
    for c, row in enumerate(per_class):
        assert float(row["accuracy"]) == pytest.approx(expected[c, c] / 4)
    wrong = np.flatnonzero(predicted != labels)
    confidence = np.exp(log_softmax)[wrong, predicted[wrong]]
    assert report.mistakes() == [int(i) for i in wrong[np.argsort(-confidence)]]
    for picture in ("confusion_matrix.png", "mistakes.png"):
        with Image.open(tmp_path / "out" / picture) as image:
            assert image.width > 100 and image.height > 100


def _standing(version: str, top1: float | None, digest: str | None = "d1") -> promotion.Standing:
    return promotion.Standing(version, top1, digest)


@pytest.mark.parametrize(
    ("policy", "new", "holder", "moves"),
    [
        ("if_better", _standing("2", 0.9), None, True),
        ("if_better", _standing("2", 0.9), _standing("1", 0.8), True),
        ("if_better", _standing("2", 0.8), _standing("1", 0.8), False),
        ("if_better", _standing("2", 0.7), _standing("1", 0.8), False),
        ("if_better", _standing("2", 0.9), _standing("1", 0.8, "d0"), False),  # another validation set
        ("if_better", _standing("2", None, None), _standing("1", 0.8), False),
        ("always", _standing("2", 0.1), _standing("1", 0.8), True),
    ],
)
def test_promotion_decision(policy, new, holder, moves):
    decision = promotion.decide(policy, new, holder)
    assert decision.move is moves
    tags = decision.as_tags()
    assert tags["bitray.promotion"] == ("moved" if moves else "kept") and tags["bitray.promotion.reason"]


def test_if_better_keeps_the_alias_on_a_worse_run_and_moves_it_on_a_better_one(mlflow_tracking_uri):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(mlflow_tracking_uri)
    client = MlflowClient(mlflow_tracking_uri)

    def attempt(top1: float, policy: str = "if_better") -> tuple[str, bool]:
        with mlflow.start_run() as run:
            info = mlflow.pyfunc.log_model(name="model", python_model=_Constant())
        version, decision = promotion.register_and_promote(
            mlflow_tracking_uri,
            run.info.run_id,
            info.model_uri,
            registered_model="bitray-pets",
            alias="champion",
            policy=policy,
            val_top1=top1,
            val_digest="same-set",
        )
        tags = client.get_run(run.info.run_id).data.tags
        assert tags["bitray.promotion"] == ("moved" if decision.move else "kept")
        return version, decision.move

    assert attempt(0.80) == ("1", True)  # the first version takes the alias
    assert attempt(0.70) == ("2", False)  # worse: the alias stays on 1
    assert str(client.get_model_version_by_alias("bitray-pets", "champion").version) == "1"
    assert attempt(0.85) == ("3", True)
    assert str(client.get_model_version_by_alias("bitray-pets", "champion").version) == "3"
    assert attempt(0.10, "always") == ("4", True)


class _Constant:
    pass


try:
    from mlflow.pyfunc import PythonModel

    class _Constant(PythonModel):  # type: ignore[no-redef]
        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
            return model_input
except ImportError:  # pragma: no cover
    pass
