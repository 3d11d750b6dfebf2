"""The evaluation a practitioner reads after a fine-tune: computed on the driver from the exported model.

``evaluate`` scores every validation image with the model that is exported (the best checkpoint), and
``write_artifacts`` writes what is logged to the MLflow run under ``evaluation/``:

- ``metrics.json``: validation loss (mean cross-entropy), top-1, top-5, image count, the set's digest;
- ``per_class.csv``: ``class,images,correct,accuracy``;
- ``confusion_matrix.csv`` (rows: true class, columns: predicted) and ``confusion_matrix.png``;
- ``mistakes.png``: a contact sheet of the most confident mistakes, each with its true and predicted label.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitray.config import StorageConfig
from bitray.finetune.augment import eval_images
from bitray.finetune.data import LabelledSet
from bitray.finetune.decode import decode_labelled_batch

EVAL_BATCH = 64
MISTAKES_SHOWN = 16


@dataclass(frozen=True)
class Evaluation:
    """Per-image logits of the validation set, and what follows from them."""

    logits: np.ndarray  # [n, classes]
    labels: np.ndarray  # [n]
    paths: list[str]
    classes: list[str]
    digest: str

    @property
    def probabilities(self) -> np.ndarray:
        shifted = self.logits - self.logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    def loss(self) -> float:
        """Mean cross-entropy of the true class."""
        shifted = self.logits - self.logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1))
        return float(np.mean(log_norm - shifted[np.arange(len(self.labels)), self.labels]))

    def top_k(self, k: int) -> float:
        """Share of images whose true class is among the ``k`` highest logits (ties count against)."""
        k = min(k, self.logits.shape[1])
        true = self.logits[np.arange(len(self.labels)), self.labels]
        higher = (self.logits > true[:, None]).sum(axis=1)
        return float(np.mean(higher < k))

    def confusion(self) -> np.ndarray:
        matrix = np.zeros((len(self.classes), len(self.classes)), np.int64)
        np.add.at(matrix, (self.labels, self.predicted), 1)
        return matrix

    def per_class(self) -> list[tuple[str, int, int, float]]:
        matrix = self.confusion()
        rows = []
        for i, name in enumerate(self.classes):
            images = int(matrix[i].sum())
            correct = int(matrix[i, i])
            rows.append((name, images, correct, correct / images if images else float("nan")))
        return rows

    def mistakes(self, count: int = MISTAKES_SHOWN) -> list[int]:
        """Indices of the wrong predictions, most confident first."""
        wrong = np.flatnonzero(self.predicted != self.labels)
        confidence = self.probabilities[wrong, self.predicted[wrong]]
        return [int(i) for i in wrong[np.argsort(-confidence, kind="stable")][:count]]

    def summary(self) -> dict[str, float]:
        return {
            "eval/loss": self.loss(),
            "eval/top1": self.top_k(1),
            "eval/top5": self.top_k(5),
            "eval/images": float(len(self.labels)),
        }


def evaluate(
    infer: Callable[[np.ndarray], np.ndarray],
    val_set: LabelledSet,
    size: int,
    storage: StorageConfig | None = None,
    exact: bool = True,
) -> Evaluation:
    """Logits of ``infer`` (float images in [0, 1] -> logits) for every decodable validation image,
    decoded as in training (``exact``: ``bitray.finetune.decode.decode_labelled_batch``)."""
    logits, labels, paths = [], [], []
    for batch in _decoded_batches(val_set, size, storage, exact):
        logits.append(np.asarray(infer(eval_images(batch["image"]))))
        labels.append(batch["label"])
        paths += [str(p) for p in batch["path"]]
    return Evaluation(
        np.concatenate(logits) if logits else np.zeros((0, len(val_set.classes)), np.float32),
        np.concatenate(labels) if labels else np.zeros((0,), np.int64),
        paths,
        val_set.classes,
        val_set.digest(),
    )


def _decoded_batches(
    val_set: LabelledSet, size: int, storage: StorageConfig | None, exact: bool
) -> Iterator[dict]:
    for start in range(0, len(val_set), EVAL_BATCH):
        paths = np.asarray(val_set.paths[start : start + EVAL_BATCH], dtype=object)
        labels = np.asarray(val_set.labels[start : start + EVAL_BATCH], np.int64)
        decoded = decode_labelled_batch(
            {"path": paths, "label": labels}, size, storage, keep_paths=True, exact=exact
        )
        if len(decoded["label"]):
            yield decoded


def write_artifacts(
    evaluation: Evaluation, directory: Path, size: int, storage: StorageConfig | None = None
) -> list[Path]:
    """Write the evaluation files into ``directory``; returns them."""
    directory.mkdir(parents=True, exist_ok=True)
    classes = evaluation.classes
    metrics = {**evaluation.summary(), "val_digest": evaluation.digest}
    files = [directory / "metrics.json"]
    files[0].write_text(json.dumps(metrics, indent=2) + "\n")

    per_class = directory / "per_class.csv"
    with per_class.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["class", "images", "correct", "accuracy"])
        writer.writerows(evaluation.per_class())
    confusion_csv = directory / "confusion_matrix.csv"
    matrix = evaluation.confusion()
    with confusion_csv.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, matrix, strict=True):
            writer.writerow([name, *row.tolist()])
    files += [per_class, confusion_csv, plot_confusion(matrix, classes, directory / "confusion_matrix.png")]
    files.append(contact_sheet(evaluation, size, storage, directory / "mistakes.png"))
    return files


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> Path:
    """A confusion matrix image, rows normalised per true class, counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    side = min(4 + 0.45 * n, 40)
    fig, ax = plt.subplots(figsize=(side, side * 0.9), dpi=100)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape, float), where=totals > 0)
    shown = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=classes, rotation=90 if n > 8 else 0)
    ax.set_yticks(ticks, labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    color = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_title(f"Confusion matrix ({int(matrix.sum())} validation images)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def contact_sheet(
    evaluation: Evaluation, size: int, storage: StorageConfig | None, path: Path, columns: int = 4
) -> Path:
    """The most confident mistakes as a grid: each image with ``true -> predicted (probability)``."""
    from PIL import Image, ImageDraw

    picked = evaluation.mistakes()
    cell, caption = max(size, 96), 30
    rows = max(1, -(-len(picked) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    if not picked:
        draw.text((8, 8), "no mistakes on the validation set", fill="black")
    probabilities = evaluation.probabilities
    for n, index in enumerate(picked):
        decoded = decode_labelled_batch(
            {"path": np.asarray([evaluation.paths[index]], dtype=object), "label": np.zeros(1, np.int64)},
            cell,
            storage,
        )
        x, y = (n % columns) * cell, (n // columns) * (cell + caption)
        if len(decoded["image"]):
            sheet.paste(Image.fromarray(decoded["image"][0]), (x, y))
        true, guess = evaluation.labels[index], evaluation.predicted[index]
        draw.text((x + 2, y + cell + 2), f"true: {evaluation.classes[true]}"[:28], fill="black")
        text = f"pred: {evaluation.classes[guess]} {probabilities[index, guess]:.2f}"
        draw.text((x + 2, y + cell + 15), text[:28], fill="firebrick")
    sheet.save(path)
    return path
