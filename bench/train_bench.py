"""Training throughput: the Ray Train loop against a plain tf_keras loop, and the fine-tuning decode rate.

``loops`` (default): both train the same model on the same decoded images (the digits, or a few-shot draw
of them with ``--shots``) with the same augmentation (random crop and flip of whole batches), batch and
TF thread count; the plain loop indexes in-memory arrays (no Ray, no strategy, no MLflow, no prefetch).
The Ray figure is the loop's own per-step time after warmup (wall time per step, its data wait
included), read back from MLflow. Prints seconds per step of both and the ratio (goal >= 0.9);
``--workers 2`` also runs 2 Ray workers of ``--cpus / 2`` CPUs each: the all-reduce's cost.

``decode``: images/s per core of the fine-tuning decode (read bytes -> uint8 at the resize size), fast
(DCT-scaled JPEG) vs exact, on 2000x1500 JPEGs made from the sample photos.

    .venv/bin/python bench/train_bench.py --steps 30 --batch 64 --size 32 --crop 28      # digits
    .venv/bin/python bench/train_bench.py --shots 10 --batch 512 --size 160 --crop 128   # few-shot
    .venv/bin/python bench/train_bench.py decode --size 448
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import bitray  # noqa: F401  (Keras 2 before TensorFlow)
from bitray.examples import write_digits
from bitray.finetune.augment import random_crop_flip
from bitray.finetune.data import LabelledSet, few_shot, make_sets
from bitray.finetune.decode import decode_encoded_batch, decode_labelled_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="loops", choices=("loops", "decode"))
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--steps", type=int, default=30, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shots", type=int, default=None, help="few-shot: K digits per class")
    parser.add_argument("--size", type=int, default=32, help="resize before the random crop")
    parser.add_argument("--crop", type=int, default=28)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray worker = TF threads of both")
    parser.add_argument("--workers", type=int, default=1, help="2: also time 2 Ray workers")
    parser.add_argument("--images", type=int, default=60, help="decode: JPEGs decoded per mode")
    args = parser.parse_args()
    print(json.dumps(decode_rates(args) if args.what == "decode" else loops(args), indent=2))


def loops(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bitray-train-bench-") as tmp:
        root = Path(tmp)
        write_digits(str(root / "digits"))
        train, _ = make_sets(str(root / "digits"), None, 0.2)
        if args.shots:
            train = few_shot(train, args.shots)
        plain = plain_loop(train, args)
        ray_1 = ray_loop(root, args, workers=1)
        ray_2 = ray_loop(root, args, workers=2) if args.workers > 1 else None
    report = {
        "model": args.model,
        "train_images": len(train),
        "batch": args.batch,
        "resize": args.size,
        "crop": args.crop,
        "cpus": args.cpus,
        "plain_tf_keras_s_per_step": round(plain, 4),
        "ray_train_1_worker_s_per_step": round(ray_1, 4),
        "ratio": round(plain / ray_1, 3),
    }
    if ray_2 is not None:
        report["ray_train_2_workers_s_per_step"] = round(ray_2, 4)
        report["steps_per_s_2_vs_1_worker"] = round(ray_1 / ray_2, 3)
    return report


def plain_loop(train: LabelledSet, args: argparse.Namespace) -> float:
    """The same step (SGD momentum, softmax CE, random crop + flip) without Ray: seconds per step."""
    import tensorflow as tf
    import tf_keras

    from bitray.model import load_model

    tf.config.threading.set_intra_op_parallelism_threads(args.cpus)
    tf.config.threading.set_inter_op_parallelism_threads(args.cpus)
    rows = decode_labelled_batch(
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
            x = random_crop_flip(images, args.crop, rng, pick)
            float(step(x, eye[labels[pick]]))
        return time.perf_counter() - start

    run(args.warmup)
    return run(args.steps) / args.steps


def ray_loop(root: Path, args: argparse.Namespace, workers: int) -> float:
    """``run_finetune`` on a fresh local Ray of ``--cpus`` CPUs: seconds per step after warmup (MLflow)."""
    import ray
    from mlflow import MlflowClient

    from bitray.config import FinetuneConfig
    from bitray.finetune import run_finetune

    total = args.warmup + args.steps
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    ray.init(
        address="local",  # a fresh local Ray, never someone's running cluster
        num_cpus=args.cpus,  # as many CPUs as the workers hold: nothing else may need one while training
        include_dashboard=False,
        runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}},
    )
    try:
        result = run_finetune(
            FinetuneConfig(
                data=str(root / "digits"),
                examples_per_class=args.shots,
                output=str(root / f"model-{workers}"),
                model=args.model,
                workers=workers,
                cpus_per_worker=args.cpus // workers,
                boundaries=[1, total - 1, total],
                batch_size=args.batch,
                resize=args.size,
                crop=args.crop,
                checkpoint_every=total,
                eval_every=total,
                storage_path=str(root / "runs"),
                tracking_uri=tracking_uri,
                registered_model=None,
                name=f"train-bench-{workers}",
            )
        )
    finally:
        ray.shutdown()
    history = MlflowClient(tracking_uri).get_metric_history(result.mlflow_run_id, "train/images_per_s")
    rates = [m.value for m in history if args.warmup < m.step < total]  # the last step includes eval
    return sum(args.batch / r for r in rates) / len(rates)


def decode_rates(args: argparse.Namespace) -> dict:
    """Images/s on one core of the fine-tuning decode at ``--size``, fast and exact."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from photos import varied_jpegs

    jpegs = varied_jpegs(args.images, [(2000, 1500), (1500, 2000)])
    report: dict = {"photos": f"{args.images} JPEGs, 2000x1500 and 1500x2000", "resize": args.size}
    batch = {
        "path": np.array([f"{i}.jpg" for i in range(len(jpegs))]),
        "label": np.zeros(len(jpegs), np.int64),
        "data": np.array(jpegs, dtype=object),
    }
    for mode in ("fast", "exact"):
        warm = {key: column[:2] for key, column in batch.items()}
        decode_encoded_batch(warm, args.size, exact=mode == "exact")
        start = time.process_time()  # CPU time of this process: per core, whatever the machine's load
        out = decode_encoded_batch(batch, args.size, exact=mode == "exact")
        seconds = time.process_time() - start
        assert out["image"].shape == (len(jpegs), args.size, args.size, 3)
        report[f"{mode}_images_per_core_s"] = round(len(jpegs) / seconds, 1)
    report["fast_vs_exact"] = round(report["fast_images_per_core_s"] / report["exact_images_per_core_s"], 2)
    return report


if __name__ == "__main__":
    main()
