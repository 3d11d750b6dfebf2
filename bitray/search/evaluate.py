"""How well an embedding output separates labelled classes, and a gate between two outputs.

The protocol (the BiT paper's transfer measures, on frozen features):

- Vectors: each labelled object's live row (its newest version) in the output, L2-normalised. Labels
  come from ``finetune.data.list_labelled`` (a ``path,label`` CSV/Parquet or a class-folder tree) and are
  matched to the output's ``path`` column; labelled images the output lacks are counted, not guessed.
- ``knn_top1_k{1,5,20}``: scikit-learn ``KNeighborsClassifier`` (cosine, brute force, majority vote; a
  tie goes to the class that sorts first, scikit-learn's rule) under the same stratified k-fold split as
  the linear probe: mean accuracy over the folds.
- ``linear_top1``: ``StandardScaler`` + ``LogisticRegression`` (lbfgs, C=1) under ``StratifiedKFold``
  (``folds`` splits, shuffled with ``seed``; fewer when the smallest class is smaller).
- ``fewshot{K}_linear_top1``, ``fewshot{K}_knn_top1_k1`` with ``--few-shot K``: train on K images per class
  (drawn with ``seed + trial``), test on the rest, mean over ``trials`` draws.

The gate: every metric of the new output is compared with the baseline's, and the gate fails when any is
lower by more than ``tolerance``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from bitray import outputs, storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.redaction import redacted
from bitray.search import vectors

log = logging.getLogger(__name__)

EXPERIMENT = "bitray-evaluate"
KNN_KS = (1, 5, 20)


@dataclass(frozen=True)
class EvalOptions:
    folds: int = 5
    seed: int = 0
    few_shot: int | None = None
    trials: int = 5

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise BitrayError(f"--folds {self.folds}: cross-validation needs at least 2 folds")
        if self.few_shot is not None and self.few_shot < 1:
            raise BitrayError(f"--few-shot {self.few_shot}: train on at least 1 image per class")
        if self.trials < 1 or self.seed < 0:
            raise BitrayError(f"trials {self.trials}, seed {self.seed}: give trials >= 1 and a seed >= 0")


@dataclass
class LabelledVectors:
    paths: list[str]
    vectors: np.ndarray  # float32 [n, d], unit length
    labels: np.ndarray  # int64 [n], indices into classes
    classes: list[str]
    model_id: str
    missing: int
    """Labelled images without a row in the output."""

    def restricted(self, paths: set[str]) -> LabelledVectors:
        """Only the images in ``paths`` (the classes stay as they are)."""
        keep = np.array([p in paths for p in self.paths], bool)
        return LabelledVectors(
            paths=[p for p, k in zip(self.paths, keep, strict=True) if k],
            vectors=self.vectors[keep],
            labels=self.labels[keep],
            classes=self.classes,
            model_id=self.model_id,
            missing=self.missing + int((~keep).sum()),
        )


@dataclass
class Evaluation:
    embeddings: str
    model_id: str
    images: int
    classes: int
    missing: int
    folds: int
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GateRow:
    metric: str
    new: float
    baseline: float

    @property
    def delta(self) -> float:
        return self.new - self.baseline


def load_labelled_vectors(
    embeddings: str, labels: str, storage_config: StorageConfig | None = None
) -> LabelledVectors:
    """The live vectors of the labelled images of ``embeddings``, read in row-group batches."""
    from bitray.finetune.data import list_labelled

    label_of = {_normal(path): label for path, label in list_labelled(labels, storage_config)}
    outputs.settings(embeddings, storage_config)  # refuses rows of two models, image sizes or decodes
    runs = outputs.finished_runs(embeddings, storage_config)
    files = outputs.committed_files(embeddings, "embeddings", storage_config, runs)
    if not files:
        raise BitrayError(f"{embeddings!r} holds no finished embedding run; run bitray embed first")
    newest = vectors.newest_versions(files, runs, storage_config)
    paths, parts, models = [], [], set()
    for batch in vectors.read_batches(files, ("path", "run_id", "model", "embedding"), storage_config):
        keep = vectors.live_mask(batch, newest) & np.fromiter(
            (p in label_of for p in batch.column("path").to_pylist()), bool, batch.num_rows
        )
        if not keep.any():
            continue
        batch = batch.filter(pa.array(keep))
        models.update(batch.column("model").unique().to_pylist())
        paths += batch.column("path").to_pylist()
        parts.append(vectors.to_vectors(batch.column("embedding")))
    if not paths:
        raise BitrayError(
            f"none of the {len(label_of)} labelled images of {labels!r} is in {embeddings!r}; the labels' "
            "paths must be the object URIs the embedding output records (embed the labelled set itself)"
        )
    if len(models) > 1:
        raise BitrayError(f"{embeddings!r} mixes models {sorted(models)}; evaluate one model's output")
    order = np.argsort(np.array(paths), kind="stable")  # the same order whatever the files' order
    names = [label_of[paths[i]] for i in order]
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    return LabelledVectors(
        paths=[paths[i] for i in order],
        vectors=np.concatenate(parts)[order],
        labels=np.array([index[n] for n in names], np.int64),
        classes=classes,
        model_id=models.pop(),
        missing=len(label_of) - len(paths),
    )


def evaluate(
    embeddings: str,
    labels: str,
    options: EvalOptions | None = None,
    storage_config: StorageConfig | None = None,
) -> Evaluation:
    """kNN and linear-probe top-1 (and few-shot, if asked) of ``embeddings`` on ``labels``."""
    _need_sklearn()
    return score(embeddings, labels, load_labelled_vectors(embeddings, labels, storage_config), options)


def evaluate_pair(
    embeddings: str,
    baseline: str,
    labels: str,
    options: EvalOptions | None = None,
    storage_config: StorageConfig | None = None,
) -> tuple[Evaluation, Evaluation]:
    """Both outputs scored on the labelled images they both hold, so the gate compares like with like."""
    _need_sklearn()
    new = load_labelled_vectors(embeddings, labels, storage_config)
    base = load_labelled_vectors(baseline, labels, storage_config)
    common = set(new.paths) & set(base.paths)
    if len(common) < len(new.paths) or len(common) < len(base.paths):
        log.warning(
            "comparing on the %d labelled images both outputs hold (%d in %s, %d in %s)",
            len(common),
            len(new.paths),
            embeddings,
            len(base.paths),
            baseline,
        )
    return (
        score(embeddings, labels, new.restricted(common), options),
        score(baseline, labels, base.restricted(common), options),
    )


def score(
    embeddings: str, labels: str, data: LabelledVectors, options: EvalOptions | None = None
) -> Evaluation:
    options = options or EvalOptions()
    counts = np.bincount(data.labels, minlength=len(data.classes))
    if len(data.classes) < 2:
        raise BitrayError(
            f"{labels!r}: evaluation needs at least 2 classes, and the embedded images of {embeddings!r} "
            f"it labels are all of one class ({data.classes[0]!r}); label images of 2 or more classes"
        )
    if counts.min() < 2:
        small = data.classes[int(counts.argmin())]
        raise BitrayError(
            f"{labels!r}: evaluation needs at least 2 embedded images of every class; class {small!r} "
            f"has {int(counts.min())}"
        )
    folds = int(min(options.folds, counts.min()))
    metrics = cross_validated(data.vectors, data.labels, folds, options.seed)
    if options.few_shot is not None:
        metrics.update(
            few_shot(data.vectors, data.labels, options.few_shot, options.trials, options.seed, data.classes)
        )
    return Evaluation(
        embeddings=embeddings,
        model_id=data.model_id,
        images=len(data.paths),
        classes=len(data.classes),
        missing=data.missing,
        folds=folds,
        metrics=metrics,
    )


def _need_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise BitrayError("bitray evaluate needs scikit-learn: pip install 'bitray[demo]'") from None


def cross_validated(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> dict[str, float]:
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    metrics = {}
    smallest_train = len(y) - -(-len(y) // folds)
    for k in KNN_KS:
        scores = cross_val_score(knn(min(k, smallest_train)), x, y, cv=split)
        metrics[f"knn_top1_k{k}"] = float(np.mean(scores))
    metrics["linear_top1"] = float(np.mean(cross_val_score(linear_probe(seed), x, y, cv=split)))
    return metrics


def few_shot(
    x: np.ndarray, y: np.ndarray, shots: int, trials: int, seed: int, classes: Sequence[str]
) -> dict[str, float]:
    counts = np.bincount(y, minlength=len(classes))
    if counts.min() <= shots:
        small = classes[int(counts.argmin())]
        raise BitrayError(
            f"--few-shot {shots} needs more than {shots} images per class; {small!r} has {counts.min()}"
        )
    linear, nearest = [], []
    for trial in range(trials):
        rng = np.random.default_rng(seed + trial)
        train = np.concatenate(
            [rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in range(len(classes))]
        )
        test = np.setdiff1d(np.arange(len(y)), train)
        linear.append(linear_probe(seed).fit(x[train], y[train]).score(x[test], y[test]))
        nearest.append(knn(1).fit(x[train], y[train]).score(x[test], y[test]))
    return {
        f"fewshot{shots}_linear_top1": float(np.mean(linear)),
        f"fewshot{shots}_knn_top1_k1": float(np.mean(nearest)),
    }


def knn(k: int):  # noqa: ANN201 - a scikit-learn estimator
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")


def linear_probe(seed: int):  # noqa: ANN201 - a scikit-learn estimator
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))


def gate(new: Evaluation, baseline: Evaluation, tolerance: float) -> tuple[bool, list[GateRow]]:
    """(passed, rows): passed when no metric of ``new`` is below the baseline's by more than ``tolerance``."""
    rows = [
        GateRow(name, value, baseline.metrics[name])
        for name, value in new.metrics.items()
        if name in baseline.metrics
    ]
    return all(row.delta >= -tolerance for row in rows), rows


def format_table(new: Evaluation, baseline: Evaluation | None, tolerance: float) -> str:
    """The metrics as a plain-text table, side by side with the baseline's when there is one."""
    head = f"{'metric':<26}{'new':>10}"
    lines = [f"new:      {new.embeddings} ({new.model_id}, {new.images} images, {new.classes} classes)"]
    if baseline is None:
        lines += [head] + [f"{name:<26}{value:>10.4f}" for name, value in new.metrics.items()]
        return "\n".join(lines)
    passed, rows = gate(new, baseline, tolerance)
    lines.insert(1, f"baseline: {baseline.embeddings} ({baseline.model_id}, {baseline.images} images)")
    lines.append(f"{head}{'baseline':>10}{'delta':>10}")
    for row in rows:
        mark = "" if row.delta >= -tolerance else "  WORSE"
        lines.append(f"{row.metric:<26}{row.new:>10.4f}{row.baseline:>10.4f}{row.delta:>+10.4f}{mark}")
    verdict = "PASS" if passed else "FAIL"
    lines.append(
        f"gate: {verdict} (tolerance {tolerance}: no metric may be lower than the baseline's by more)"
    )
    return "\n".join(lines)


def log_to_mlflow(
    new: Evaluation, baseline: Evaluation | None, tolerance: float, labels: str, tracking_uri: str
) -> str | None:
    """One run in experiment ``bitray-evaluate``; its id, or ``None`` (with a warning) when MLflow fails.

    Tracking must not decide the gate: an unreachable server costs a warning, not the evaluation.
    """
    from mlflow import MlflowClient

    from bitray.mlflow_client import ensure_experiment, quick_failures

    quick_failures()
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        run = client.create_run(ensure_experiment(client, EXPERIMENT), run_name=f"evaluate-{new.model_id}")
        run_id = run.info.run_id
        params = {
            "embeddings": new.embeddings,
            "labels": labels,
            "model_id": new.model_id,
            "images": new.images,
            "classes": new.classes,
            "missing": new.missing,
            "folds": new.folds,
        }
        if baseline is not None:
            params.update(
                baseline=baseline.embeddings, baseline_model_id=baseline.model_id, tolerance=tolerance
            )
        for key, value in params.items():
            client.log_param(run_id, key, value)
        for key, value in new.metrics.items():
            client.log_metric(run_id, key, value)
        if baseline is not None:
            passed, rows = gate(new, baseline, tolerance)
            for row in rows:
                client.log_metric(run_id, f"baseline/{row.metric}", row.baseline)
                client.log_metric(run_id, f"delta/{row.metric}", row.delta)
            client.set_tag(run_id, "bitray.gate", "pass" if passed else "fail")
        client.set_terminated(run_id)
        return run_id
    except Exception as exc:  # MLflow raises many types; none may stop the gate
        log.warning("could not log the evaluation to MLflow at %s: %s", redacted(tracking_uri), redacted(exc))
        return None


def _normal(uri: str) -> str:
    return uri if storage.is_remote(uri) else str(storage.local_path(uri))
