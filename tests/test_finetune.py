"""Fine-tuning end to end: real Ray Train workers, a real S3 endpoint (moto), a real MLflow sqlite store.

Tiny settings keep it to a few minutes on 2 cores: ``random:tiny`` BiT, digits resized to 32 and cropped
to 28, batch 64, a couple of hundred steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitray.config import FinetuneConfig
from bitray.examples import iter_digits, write_digits

pytestmark = pytest.mark.slow

TINY = {
    "model": "random:tiny",
    "resize": 32,
    "crop": 28,
    "batch_size": 64,
    "base_lr": 0.03,
}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digits(str(root))
    return root


def test_finetune_digits_from_s3_two_workers(s3_server, s3_bucket, ray_local, mlflow_tracking_uri, tmp_path):
    import mlflow
    import tensorflow as tf
    from mlflow import MlflowClient

    from bitray.finetune import run_finetune
    from bitray.model import load_model
    from bitray.model.registry import resolve_registered_model

    data = f"s3://{s3_bucket}/digits"
    assert write_digits(data) == 1797
    config = FinetuneConfig(
        data=data,
        output=f"s3://{s3_bucket}/model",
        workers=2,
        boundaries=[10, 140, 170, 200],
        checkpoint_every=100,
        eval_every=100,
        name="digits-s3",
        storage_path=f"s3://{s3_bucket}/runs",
        tracking_uri=mlflow_tracking_uri,
        registered_model="digits-tiny",
        model_alias="champion",
        **TINY,
    )
    result = run_finetune(config)

    assert result.steps == 200
    assert result.val_top1 is not None and result.val_top1 >= 0.90, result
    assert result.checkpoint_path.startswith(f"{s3_bucket}/runs/digits-s3/")

    client = MlflowClient(tracking_uri=mlflow_tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    params = run.data.params
    assert params["model"] == "random:tiny" and params["world_size"] == "2"
    assert params["boundaries"] == "10,140,170,200" and params["base_lr"] == "0.03"
    assert params["train_size"] == "1438" and params["val_size"] == "359"  # 20% of each class held out
    assert params["mixup_alpha"] == "0.0" and params["momentum"] == "0.9"
    assert params["bitray_version"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 201))
    # metrics at step k describe optimizer step k, which used the LR of schedule step k - 1
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert (lrs[1], lrs[2], lrs[100], lrs[200]) == pytest.approx((0.0, 0.003, 0.03, 0.0003))
    val = client.get_metric_history(run.info.run_id, "val/top1")
    assert [m.step for m in val] == [100, 200] and val[-1].value == pytest.approx(result.val_top1)
    assert client.get_metric_history(run.info.run_id, "train/images_per_s")
    assert run.info.status == "FINISHED"

    version = client.get_model_version_by_alias("digits-tiny", "champion")
    assert version.run_id == run.info.run_id

    # closing the loop: the registered model and the exported SavedModel embed identically
    images = np.stack([_digit_image(i) for i in range(4)])
    exported = load_model(f"savedmodel:{result.feature_vector_uri}")
    registered = load_model(f"savedmodel:{resolve_registered_model('models:/digits-tiny@champion')}")
    assert exported.feature_dim == registered.feature_dim
    np.testing.assert_allclose(exported.model(images).numpy(), registered.model(images).numpy(), atol=1e-5)
    classifier = mlflow.pyfunc.load_model("models:/digits-tiny@champion")
    predicted = classifier.predict(images)
    assert len(predicted) == 4 and set(predicted["label"]) <= set("0123456789")
    assert [len(k) for k in predicted["top_k_labels"]] == [5] * 4
    assert classifier.metadata.signature is not None
    loaded = load_model("models:/digits-tiny@champion", classifier=True)
    assert loaded.class_names == [str(d) for d in range(10)]
    probabilities = tf.nn.softmax(loaded.model(images)).numpy()
    np.testing.assert_allclose(predicted["score"], probabilities.max(axis=1), atol=1e-5)


def _digit_image(index: int) -> np.ndarray:
    from bitray.images import decode_image, resize_for_model

    for n, _digit, png in iter_digits():
        if n == index:
            return resize_for_model(decode_image(png).pixels, (28, 28))
    raise IndexError(index)


def test_two_workers_and_accumulation_match_one_worker(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    # defined here, not at module level: Ray ships it by value (workers cannot import the test module)
    def _equivalence_loop(cfg: dict) -> None:
        """Three optimizer steps on fixed data; rank 0 saves the weights. With ``accumulate``, one worker
        also trains a second copy in two micro-batches per step."""
        import ray.train
        import tensorflow as tf
        import tf_keras

        from bitray.finetune.loop import make_train_step
        from bitray.model import load_model

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        rng = np.random.default_rng(7)
        batch = 16
        x = rng.random((3, batch, 32, 32, 3), dtype=np.float32)
        y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, (3, batch))]
        results = {}
        for accumulation in (1, 2) if cfg["accumulate"] else (1,):
            with strategy.scope():
                model = load_model("random:tiny", num_classes=10, trainable=True).model
                optimizer = tf_keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)
                optimizer.build(model.trainable_variables)
            step = make_train_step(strategy, model, optimizer, batch, accumulation)
            for s in range(3):
                # this worker's share of the global batch
                local_x, local_y = x[s][rank::world], y[s][rank::world]
                shape = (accumulation, len(local_x) // accumulation)
                step(local_x.reshape(*shape, 32, 32, 3), local_y.reshape(*shape, 10))
            weights = np.concatenate([v.numpy().ravel() for v in model.weights])
            results[f"accumulation_{accumulation}"] = weights
        if rank == 0:
            np.savez(cfg["out"], **results)
        ray.train.report({"done": 1})

    def train(workers: int, accumulate: bool) -> dict:
        out = tmp_path / f"weights-{workers}.npz"
        TensorflowTrainer(
            _equivalence_loop,
            train_loop_config={"out": str(out), "accumulate": accumulate},
            scaling_config=ScalingConfig(num_workers=workers),
            run_config=RunConfig(name=f"equivalence-{workers}", storage_path=str(tmp_path / "runs")),
        ).fit()
        return dict(np.load(out))

    one = train(1, accumulate=True)
    two = train(2, accumulate=False)
    start = np.concatenate([v.numpy().ravel() for v in _fresh_tiny().weights])
    assert np.abs(one["accumulation_1"] - start).max() > 1e-3  # the steps did move the weights
    np.testing.assert_allclose(two["accumulation_1"], one["accumulation_1"], atol=2e-5)
    np.testing.assert_allclose(one["accumulation_2"], one["accumulation_1"], atol=2e-5)


def _fresh_tiny():  # noqa: ANN202 - tf_keras.Model
    from bitray.model import load_model

    return load_model("random:tiny", num_classes=10).model


def test_one_and_five_shot_train_at_the_hyperrule_batch(digits_dir, ray_local, mlflow_tracking_uri, tmp_path):
    """10 and 50 training images with batch 512 (the HyperRule's): the set is repeated to fill batches."""
    from mlflow import MlflowClient

    from bitray.finetune import run_finetune

    client = MlflowClient(tracking_uri=mlflow_tracking_uri)
    for shots in (1, 5):
        config = FinetuneConfig(
            data=str(digits_dir),
            examples_per_class=shots,
            output=str(tmp_path / f"model-{shots}"),
            boundaries=[1, 2, 3],
            name=f"digits-{shots}-shot",
            storage_path=str(tmp_path / "runs"),
            tracking_uri=mlflow_tracking_uri,
            model="random:tiny",
            resize=32,
            crop=28,
            cache_decoded=False if shots == 1 else None,  # 1-shot: the encoded-bytes cache, decoded per epoch
        )
        assert config.batch_size == 512 and config.micro_batch is None
        result = run_finetune(config)
        assert result.steps == 3 and result.exported_step == 3

        run = client.get_run(result.mlflow_run_id)
        params = run.data.params
        assert params["train_size"] == str(10 * shots) and params["examples_per_class"] == str(shots)
        assert params["batch_size"] == "512" and params["val_size"] == "359"
        assert params["resolution_median_area"] == "64"  # 8x8 digits: the small-image rule
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert {
            f"evaluation/{n}" for n in ("confusion_matrix.png", "confusion_matrix.csv", "mistakes.png")
        } <= artifacts
        top1 = client.get_metric_history(run.info.run_id, "eval/top1")[-1].value
        assert top1 == pytest.approx(result.val_top1)
        # the default registered name comes from the data set; the promotion decision is on the run
        assert (
            run.data.tags["bitray.registered_model"] == f"models:/bitray-{digits_dir.name}/{shots // 5 + 1}"
        )
        assert run.data.tags["bitray.promotion"] in ("moved", "kept")
        assert Path(result.classifier_uri, "assets", "labels.txt").read_text().split() == list("0123456789")
