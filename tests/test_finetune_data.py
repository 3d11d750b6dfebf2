"""Labelled sets, the train/validation split, HyperRule augmentation and the digits writer (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitray.errors import BitrayError
from bitray.examples import write_digits
from bitray.finetune.augment import mixup, random_crop_flip
from bitray.finetune.data import (
    LabelledSet,
    few_shot,
    list_labelled,
    make_sets,
    median_image_area,
    split_pairs,
)
from bitray.images import decode_image


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_class_folders_are_listed_with_their_labels(tmp_path):
    for label in ("cat", "dog"):
        for i in range(3):
            _png(tmp_path / label / f"{i}.png")
    _png(tmp_path / "stray.png")  # beside the class folders: no label, not listed
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    pairs = list_labelled(str(tmp_path))
    assert [label for _, label in pairs] == ["cat"] * 3 + ["dog"] * 3
    assert all(Path(p).is_file() and p.endswith(".png") for p, _ in pairs)


def test_class_folders_given_as_a_relative_path(tmp_path, monkeypatch):
    for label in ("cat", "dog"):
        _png(tmp_path / "set" / label / "0.png")
    monkeypatch.chdir(tmp_path)
    for root in ("./set", "set/", "set"):
        assert [label for _, label in list_labelled(root)] == ["cat", "dog"]


def test_manifest_csv_with_relative_and_absolute_paths(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "elsewhere" / "b.png")
    manifest = tmp_path / "train.csv"
    manifest.write_text(f"path,label\nimgs/a.png,one\n{tmp_path / 'elsewhere' / 'b.png'},two\n")
    assert list_labelled(str(manifest)) == [
        (str(tmp_path / "elsewhere" / "b.png"), "two"),
        (f"{tmp_path}/imgs/a.png", "one"),
    ]


def test_manifest_parquet_and_missing_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["x.png"], "label": [3]}), tmp_path / "m.parquet")
    assert list_labelled(str(tmp_path / "m.parquet")) == [(f"{tmp_path}/x.png", "3")]
    pq.write_table(pa.table({"file": ["x.png"]}), tmp_path / "bad.parquet")
    with pytest.raises(BitrayError, match="lacks column"):
        list_labelled(str(tmp_path / "bad.parquet"))


def test_empty_or_single_class_data_is_refused(tmp_path):
    with pytest.raises(BitrayError, match="no labelled images"):
        make_sets(str(tmp_path), None, 0.2)
    for i in range(3):
        _png(tmp_path / "only" / f"{i}.png")
    with pytest.raises(BitrayError, match="at least 2"):
        make_sets(str(tmp_path), None, 0.2)


def test_split_is_stratified_deterministic_and_disjoint():
    pairs = [(f"s3://b/{label}/{i}.png", label) for label in "abc" for i in range(10 if label != "c" else 2)]
    train, val = split_pairs(pairs, 0.2, seed=1)
    assert sorted(train + val) == sorted(pairs) and not set(train) & set(val)
    assert sorted(label for _, label in val) == ["a", "a", "b", "b", "c"]  # 20% of 10, at least 1 of 2
    assert split_pairs(list(reversed(pairs)), 0.2, seed=1) == (train, val)
    assert split_pairs(pairs, 0.2, seed=2) != (train, val)


def test_validation_folder_with_unknown_label_is_refused(tmp_path):
    for label in ("a", "b"):
        _png(tmp_path / "train" / label / "0.png")
    _png(tmp_path / "val" / "z" / "0.png")
    with pytest.raises(BitrayError, match=r"labels not in .*\['z'\]"):
        make_sets(str(tmp_path / "train"), str(tmp_path / "val"), 0.2)


def test_random_crop_and_flip_are_random_and_in_range():
    rng = np.random.default_rng()
    images = np.zeros((64, 10, 10, 3), np.uint8)
    images[:, :, :5] = 255  # left half white: a flip moves it to the right
    out = random_crop_flip(images, 8, rng)
    assert out.shape == (64, 8, 8, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    left_white = out[:, :, 0, 0] == 1.0
    flipped = ~left_white.all(axis=1)
    assert 0 < flipped.sum() < 64  # some flipped, some not
    crops = {tuple(np.round(o[0, :, 0], 3)) for o in out}
    assert len(crops) > 1  # different horizontal offsets across the batch


def test_mixup_uses_one_lambda_per_batch_and_is_off_at_zero():
    rng = np.random.default_rng(0)
    x = rng.random((16, 4, 4, 3)).astype(np.float32)
    y = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 16)]
    same_x, same_y = mixup(x, y, 0.0, rng)
    assert same_x is x and same_y is y
    mixed_x, mixed_y = mixup(x, y, 1.0, rng)  # Beta(1, 1): lambda far from 0 and 1 at this seed
    np.testing.assert_allclose(mixed_y.sum(axis=1), 1.0, rtol=1e-6)
    weights = {round(float(row.max()), 5) for row in mixed_y if np.count_nonzero(row) == 2}
    assert len(weights) <= 1  # every two-label row mixes with the same lambda
    assert not np.allclose(mixed_x, x)


def test_write_digits_writes_the_real_digits(tmp_path):
    assert write_digits(str(tmp_path)) == 1797
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == 1797 and sorted({f.parent.name for f in files}) == [str(d) for d in range(10)]
    first = decode_image((tmp_path / "0" / "0000.png").read_bytes())
    assert (first.width, first.height) == (8, 8)
    from sklearn.datasets import load_digits

    expected = np.round(load_digits().images[0] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(first.pixels[:, :, 0], expected)


def test_cli_writes_digits_and_refuses_finetune_without_data(tmp_path, capsys):
    from bitray.cli import main

    assert main(["data", "digits", "--output", str(tmp_path / "digits")]) == 0
    assert len(list((tmp_path / "digits").rglob("*.png"))) == 1797
    assert main(["finetune", "--output", str(tmp_path / "model")]) == 2
    assert "no training data given; pass --data" in capsys.readouterr().err


def test_cli_rejects_a_worker_count_that_does_not_divide_the_batch(tmp_path, capsys):
    from bitray.cli import main

    for label in ("a", "b"):
        for i in range(3):
            _png(tmp_path / "data" / label / f"{i}.png")
    code = main(
        [
            "finetune",
            "--data",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "m"),
            "--workers",
            "3",
            "--batch-size",
            "64",
            "--model",
            "random:tiny",
        ]
    )
    assert code == 2
    assert "must be divisible by workers 3" in capsys.readouterr().err


def _sized(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(path)


def test_few_shot_draws_k_per_class_seeded():
    paths = [f"/d/{c}/{i}.png" for c in "abc" for i in range(6)]
    labelled = LabelledSet(paths, [i // 6 for i in range(18)], ["a", "b", "c"])
    five = few_shot(labelled, 5, seed=3)
    assert sorted(five.labels) == [0] * 5 + [1] * 5 + [2] * 5 and five.classes == labelled.classes
    assert five == few_shot(labelled, 5, seed=3) and five != few_shot(labelled, 5, seed=4)
    assert len(few_shot(labelled, 1)) == 3
    with pytest.raises(BitrayError, match=r"examples_per_class 7: class\(es\) \['a', 'b', 'c'\]"):
        few_shot(labelled, 7)


def test_resolution_comes_from_the_median_of_a_header_sample(tmp_path):
    # sorted first: a large image, which alone used to decide; most images are thumbnails
    _sized(tmp_path / "a" / "0000.png", 640, 480)
    for i in range(1, 8):
        _sized(tmp_path / "a" / f"{i:04d}.png", 64, 48)
    (tmp_path / "a" / "0008.png").write_bytes(b"not an image")  # skipped, not fatal
    paths = [str(p) for p in sorted((tmp_path / "a").iterdir())]
    sample = median_image_area(paths, sample=256, seed=0)
    assert (sample.median_area, sample.sampled, sample.skipped) == (64 * 48, 8, 1)
    small = median_image_area(paths, sample=3, seed=1)
    assert small.sampled + small.skipped == 3
    assert small == median_image_area(paths, sample=3, seed=1)
    with pytest.raises(BitrayError, match=r"none of the 1 sampled images"):
        median_image_area([paths[-1]])


def test_digest_names_the_set_not_its_order():
    one = LabelledSet(["x", "y"], [0, 1], ["a", "b"])
    assert one.digest() == LabelledSet(["y", "x"], [1, 0], ["a", "b"]).digest()
    assert one.digest() != LabelledSet(["x", "y"], [1, 0], ["a", "b"]).digest()


def test_an_epoch_without_a_batch_fails_at_once():
    from bitray.finetune.inputs import endless_batches

    class EmptyShard:  # every image of the shard was undecodable
        def iter_batches(self, **kwargs):
            return iter(())

    with pytest.raises(BitrayError, match=r"cannot form a batch of 512 images"):
        next(endless_batches(EmptyShard(), 512))


def test_mixup_draws_one_lambda_per_optimizer_step():
    from bitray.finetune.inputs import mix

    images = np.zeros((2, 3, 1, 1, 1), np.float32)
    images[0] = 1.0  # micro-batch 0 all ones, micro-batch 1 all zeros
    onehot = np.tile(np.eye(2, dtype=np.float32)[[0]], (2, 3, 1))
    onehot[1] = np.eye(2, dtype=np.float32)[[1]]
    mixed, targets = mix(images, onehot, 0.1, np.random.default_rng(0))
    assert mixed.shape == images.shape and targets.shape == onehot.shape
    # one lambda for all six images: each is lam, 1 - lam, 0 or 1, and the targets agree with the pixels
    lam = float(np.random.default_rng(0).beta(0.1, 0.1))
    allowed = np.array([0.0, 1.0, lam, 1 - lam])
    assert np.abs(mixed.reshape(-1, 1) - allowed).min(axis=1).max() < 1e-6
    np.testing.assert_allclose(targets[..., 0], mixed[..., 0, 0, 0], atol=1e-6)


def test_prefetcher_runs_ahead_and_hands_over_errors():
    import threading

    from bitray.finetune.loop import Prefetcher

    produced = []
    lock = threading.Lock()

    def produce() -> int:
        with lock:
            produced.append(len(produced))
            if len(produced) == 4:
                raise BitrayError("no more")
            return produced[-1]

    ahead = Prefetcher(produce, depth=2)
    assert [ahead.next() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(BitrayError, match="no more"):
        ahead.next()
    ahead.stop()


def test_each_epoch_of_a_set_in_memory_is_a_seeded_permutation_split_over_workers():
    from bitray.finetune.sampling import step_indices, worker_indices

    n, batch = 10, 4  # 2.5 steps per epoch: batches straddle epochs
    stream = np.concatenate([step_indices(s, n, batch, seed=3) for s in range(5)])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])  # a fresh order every epoch
    np.testing.assert_array_equal(step_indices(3, n, batch, seed=3), stream[12:16])  # a function of the step
    assert not np.array_equal(step_indices(0, n, batch, seed=4), stream[:4])
    # two workers, two micro-batches of 2: together exactly the global batch, in order
    parts = [worker_indices(3, n, batch, 2, world=2, rank=r, seed=3) for r in (0, 1)]
    assert parts[0].shape == (2, 1)
    np.testing.assert_array_equal(np.stack(parts, axis=1).reshape(-1), stream[12:16])


def test_a_set_smaller_than_a_batch_is_drawn_with_replacement_per_step():
    from bitray.finetune.sampling import step_indices

    first = step_indices(7, 10, 512, seed=0)
    assert first.shape == (512,) and set(first) == set(range(10))  # every image, many times
    np.testing.assert_array_equal(first, step_indices(7, 10, 512, seed=0))
    assert not np.array_equal(first, step_indices(8, 10, 512, seed=0))


def test_crop_flip_gathers_the_picked_images():
    rng = np.random.default_rng(0)
    images = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 6, 6, 3), np.uint8)
    out = random_crop_flip(images, 4, rng, np.array([4, 4, 1]))
    assert out.shape == (3, 4, 4, 3)
    np.testing.assert_allclose(out[:, 0, 0, 0] * 255, [4, 4, 1], atol=1e-4)


def test_a_step_held_in_memory_is_the_same_after_a_restart():
    from bitray.config import FinetuneConfig
    from bitray.finetune.inputs import MemoryBatches, Worker
    from bitray.hyperrule import resolve

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 10, 10, 3), dtype=np.uint8)
    labels = np.arange(30) % 3
    config = FinetuneConfig(batch_size=8, micro_batch=4, resize=10, crop=8, mixup_alpha=0.1, steps=10)
    hp = resolve(config, 30, 100.0)

    def inputs(step: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return MemoryBatches(images, labels, None, Worker(hp, 3, rank, 2, seed=5)).step_inputs(step)

    x, y = inputs(6, 1)
    assert x.shape == (2, 2, 8, 8, 3) and y.shape == (2, 2, 3)  # 2 micro-batches of 2 on each of 2 workers
    again_x, again_y = inputs(6, 1)  # a fresh worker (as after a restart) resuming at step 6
    np.testing.assert_array_equal(x, again_x)
    np.testing.assert_array_equal(y, again_y)
    assert not np.array_equal(x, inputs(6, 0)[0]) and not np.array_equal(x, inputs(7, 1)[0])
