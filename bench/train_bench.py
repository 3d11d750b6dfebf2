"""Training throughput: the Ray Train loop (1 worker) against a plain tf_keras loop, in one run.

Both train the same model on the same decoded digits with the same augmentation, batch and TF thread
count; the plain loop reads in-memory arrays (no Ray Data, no strategy, no MLflow). The Ray figure is the
mean of the loop's own per-step images/s over the steps after warmup (wall time per step including its
data wait), read back from MLflow. Prints both and the ratio (goal >= 0.85).

    .venv/bin/python bench/train_bench.py --steps 60 --batch 64 --size 32 --crop 28 --model random:tiny
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import bitray  # noqa: F401  (Keras 2 before TensorFlow)
from bitray import data as bdata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--steps", type=int, default=60, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="resize before the random crop")
    parser.add_argument("--crop", type=int, default=28)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray worker = TF threads of both")
    parser.add_argument("--gpus", type=float, default=0)
    parser.add_argument("--shuffle", default="global", choices=("global", "local"), help="Ray loop's shuffle")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bitray-train-bench-") as tmp:
        root = Path(tmp)
        bdata.write_digits(str(root / "digits"))
        plain = plain_loop(root / "digits", args)
        ray_ips = ray_loop(root, args)
    report = {
        "model": args.model,
        "batch": args.batch,
        "crop": args.crop,
        "cpus": args.cpus,
        "shuffle": args.shuffle,
        "plain_tf_keras_images_per_s": round(plain, 1),
        "ray_train_images_per_s": round(ray_ips, 1),
        "ratio": round(ray_ips / plain, 3),
    }
    print(json.dumps(report, indent=2))


def plain_loop(digits: Path, args: argparse.Namespace) -> float:
    """The same step (SGD momentum, softmax CE, random crop + flip) without Ray: images/s."""
    import tensorflow as tf
    import tf_keras

    from bitray.model import load_model

    tf.config.threading.set_intra_op_parallelism_threads(args.cpus)
    tf.config.threading.set_inter_op_parallelism_threads(args.cpus)
    train, _ = bdata.make_sets(str(digits), None, 0.2)
    rows = bdata.decode_labelled_batch(
        {"path": np.array(train.paths), "label": np.array(train.labels)}, size=args.size, storage=None
    )
    images, labels = rows["image"], rows["label"]
    num_classes = len(train.classes)
    model = load_model(args.model, num_classes=num_classes, trainable=True).model
    optimizer = tf_keras.optimizers.SGD(learning_rate=0.003, momentum=0.9)
    eye = np.eye(num_classes, dtype=np.float32)

    @tf.function
    def step(x, y):  # noqa: ANN001, ANN202
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(y, model(x, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    rng = np.random.default_rng()

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            pick = rng.integers(0, len(images), size=args.batch)
            x = bdata.random_crop_flip(images[pick], args.crop, rng)
            float(step(x, eye[labels[pick]]))
        return time.perf_counter() - start

    run(args.warmup)
    return args.steps * args.batch / run(args.steps)


def ray_loop(root: Path, args: argparse.Namespace) -> float:
    """``run_finetune`` with one worker; its per-step images/s after warmup, from MLflow."""
    import ray
    from mlflow import MlflowClient

    from bitray.config import FinetuneConfig
    from bitray.finetune import run_finetune

    total = args.warmup + args.steps
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    ray.init(
        address="local",  # a fresh local Ray, never someone's running cluster
        num_cpus=args.cpus + 2,
        num_gpus=args.gpus or None,
        include_dashboard=False,
        runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}},
    )
    try:
        result = run_finetune(
            FinetuneConfig(
                data=str(root / "digits"),
                output=str(root / "model"),
                model=args.model,
                workers=1,
                cpus_per_worker=args.cpus,
                gpus_per_worker=args.gpus,
                boundaries=[1, total - 1, total],
                batch_size=args.batch,
                resize=args.size,
                crop=args.crop,
                checkpoint_every=total,
                eval_every=total,
                storage_path=str(root / "runs"),
                tracking_uri=tracking_uri,
                registered_model=None,
                shuffle=args.shuffle,
                name="train-bench",
            )
        )
    finally:
        ray.shutdown()
    history = MlflowClient(tracking_uri).get_metric_history(result.mlflow_run_id, "train/images_per_s")
    rates = [m.value for m in history if args.warmup < m.step < total]  # the last step includes eval
    return len(rates) / sum(1.0 / r for r in rates)  # mean throughput: total images / total time


if __name__ == "__main__":
    main()
