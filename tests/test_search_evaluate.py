"""Evaluation over real pipeline outputs: numbers equal scikit-learn's, the gate, and the closed loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from embed_fixtures import tiny_config

from bitray.errors import BitrayError

pytestmark = pytest.mark.slow


def write_digit_split(root: Path, parity: int, per_class: int | None = None) -> Path:
    """The digits with ``n % 2 == parity`` as class folders ``root/<digit>/<n>.png``."""
    from bitray.examples import iter_digits

    counts: dict[int, int] = {}
    for n, digit, png in iter_digits():
        if n % 2 != parity or counts.get(digit, 0) == (per_class or 10**9):
            continue
        counts[digit] = counts.get(digit, 0) + 1
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
        (root / str(digit) / f"{n:04d}.png").write_bytes(png)
    return root


@pytest.fixture(scope="module")
def digits_output(tmp_path_factory, ray_local) -> dict:
    from bitray.embed import run_embedding

    root = tmp_path_factory.mktemp("eval")
    labelled = write_digit_split(root / "digits", 1, per_class=12)
    output = root / "out"
    run_embedding(tiny_config([str(labelled)], str(output), run_id="digits-a"))
    return {"root": root, "labels": labelled, "output": output}


def direct(output: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vectors and labels read with pyarrow alone, sorted by path, unit length."""
    table = pq.read_table(output / "embeddings").sort_by("path")
    x = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.array([int(Path(p).parent.name) for p in table.column("path").to_pylist()])
    return x, y


def test_metrics_equal_a_direct_scikit_learn_computation(digits_output):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bitray.search.evaluate import EvalOptions, evaluate

    result = evaluate(
        str(digits_output["output"]), str(digits_output["labels"]), EvalOptions(few_shot=3, trials=2)
    )
    assert (result.images, result.classes, result.missing, result.folds) == (120, 10, 0, 5)
    assert result.model_id == "bit-tiny@random-init"
    x, y = direct(digits_output["output"], digits_output["labels"])
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    for k in (1, 5, 20):
        knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
        assert result.metrics[f"knn_top1_k{k}"] == pytest.approx(
            cross_val_score(knn, x, y, cv=cv).mean(), abs=1e-12
        )
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    assert result.metrics["linear_top1"] == pytest.approx(
        cross_val_score(probe, x, y, cv=cv).mean(), abs=1e-9
    )
    # few-shot: 3 per class drawn with seed + trial, tested on the rest
    linear, nearest = [], []
    for trial in range(2):
        rng = np.random.default_rng(trial)
        train = np.concatenate([rng.choice(np.flatnonzero(y == c), 3, replace=False) for c in range(10)])
        test = np.setdiff1d(np.arange(len(y)), train)
        linear.append(probe.fit(x[train], y[train]).score(x[test], y[test]))
        one = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute")
        nearest.append(one.fit(x[train], y[train]).score(x[test], y[test]))
    assert result.metrics["fewshot3_linear_top1"] == pytest.approx(np.mean(linear))
    assert result.metrics["fewshot3_knn_top1_k1"] == pytest.approx(np.mean(nearest))


def test_labels_as_csv_with_missing_images_and_errors(digits_output, tmp_path):
    from bitray.search.evaluate import evaluate

    folders = sorted(Path(digits_output["labels"]).glob("*/*.png"))
    csv = tmp_path / "labels.csv"
    lines = ["path,label", *(f"{p},{p.parent.name}" for p in folders), f"{tmp_path / 'gone.png'},3"]
    csv.write_text("\n".join(lines) + "\n")
    result = evaluate(str(digits_output["output"]), str(csv))
    assert (result.images, result.missing) == (120, 1)
    base = evaluate(str(digits_output["output"]), str(digits_output["labels"]))
    assert result.metrics == base.metrics
    with pytest.raises(BitrayError, match="none of the 1 labelled images"):
        (tmp_path / "other.csv").write_text(f"path,label\n{tmp_path / 'x.png'},1\n")
        evaluate(str(digits_output["output"]), str(tmp_path / "other.csv"))


def test_a_pair_is_scored_on_the_images_both_outputs_hold(digits_output, tmp_path):
    from bitray.embed import run_embedding
    from bitray.search.evaluate import evaluate, evaluate_pair

    subset = sorted(Path(digits_output["labels"]).glob("*/*.png"))[::2]
    smaller = tmp_path / "smaller"
    run_embedding(tiny_config([str(p) for p in subset], str(smaller), run_id="half"))
    new, base = evaluate_pair(str(smaller), str(digits_output["output"]), str(digits_output["labels"]))
    assert (new.images, base.images, new.missing, base.missing) == (60, 60, 60, 60)
    assert new.metrics == base.metrics  # the same model on the same images
    assert evaluate(str(digits_output["output"]), str(digits_output["labels"])).images == 120


def test_gate_of_an_output_against_itself_passes(digits_output, mlflow_tracking_uri, capsys):
    from mlflow import MlflowClient

    from bitray.cli import main

    out, labels = str(digits_output["output"]), str(digits_output["labels"])
    argv = [
        "evaluate",
        "--embeddings",
        out,
        "--labels",
        labels,
        "--baseline",
        out,
        "--tracking-uri",
        mlflow_tracking_uri,
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "gate: PASS" in printed and "knn_top1_k20" in printed and "baseline" in printed
    client = MlflowClient(tracking_uri=mlflow_tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bitray-evaluate").experiment_id])
    assert run.data.tags["bitray.gate"] == "pass" and run.data.metrics["delta/linear_top1"] == 0.0
    assert set(run.data.metrics) >= {
        "knn_top1_k1",
        "knn_top1_k5",
        "knn_top1_k20",
        "linear_top1",
        "baseline/knn_top1_k1",
    }


def test_closed_loop_fine_tuned_embeddings_pass_the_gate_and_the_base_fails(
    tmp_path, ray_local, mlflow_tracking_uri, capsys
):
    """Fine-tune random:tiny on half the digits, embed 50 per class of the other half with base and tuned
    models, gate both ways."""
    from mlflow import MlflowClient

    from bitray.cli import main
    from bitray.config import FinetuneConfig
    from bitray.embed import run_embedding
    from bitray.finetune import run_finetune

    train = write_digit_split(tmp_path / "train", 0)
    held_out = write_digit_split(tmp_path / "held-out", 1, per_class=50)
    result = run_finetune(
        FinetuneConfig(
            data=str(train),
            val_fraction=0.0,
            output=str(tmp_path / "model"),
            model="random:tiny",
            resize=32,
            crop=28,
            batch_size=64,
            base_lr=0.03,
            boundaries=[10, 80, 100, 120],
            checkpoint_every=120,
            eval_every=120,
            storage_path=str(tmp_path / "runs"),
            tracking_uri=mlflow_tracking_uri,
            registered_model=None,
            name="closed-loop",
        )
    )
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    run_embedding(tiny_config([str(held_out)], str(base), batch_size=64))
    run_embedding(
        tiny_config(
            [str(held_out)], str(tuned), batch_size=64, model=f"savedmodel:{result.feature_vector_uri}"
        )
    )

    common = ["--labels", str(held_out), "--few-shot", "1", "--tracking-uri", mlflow_tracking_uri]
    assert main(["evaluate", "--embeddings", str(tuned), "--baseline", str(base), *common]) == 0
    table = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n{table}")  # the side-by-side table, in the log of a run with -s
    assert main(["evaluate", "--embeddings", str(base), "--baseline", str(tuned), *common]) == 1
    assert "gate: FAIL" in capsys.readouterr().out

    client = MlflowClient(tracking_uri=mlflow_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("bitray-evaluate").experiment_id])
    forward = next(r for r in runs if r.data.tags["bitray.gate"] == "pass").data.metrics
    for metric in ("knn_top1_k1", "knn_top1_k5", "knn_top1_k20", "linear_top1"):
        assert forward[f"delta/{metric}"] > 0.01, (metric, forward)
    assert forward["delta/fewshot1_knn_top1_k1"] >= 0.2, forward
