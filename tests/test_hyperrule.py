"""The HyperRule against the values published in the BiT paper and google-research/big_transfer."""

from __future__ import annotations

import pytest

from bitray import hyperrule
from bitray.config import FinetuneConfig
from bitray.errors import BitrayError


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1, [100, 200, 300, 400, 500]),
        (1_797, [100, 200, 300, 400, 500]),
        (19_999, [100, 200, 300, 400, 500]),
        (20_000, [500, 3000, 6000, 9000, 10000]),
        (499_999, [500, 3000, 6000, 9000, 10000]),
        (500_000, [500, 6000, 12000, 18000, 20000]),
        (1_281_167, [500, 6000, 12000, 18000, 20000]),
    ],
)
def test_schedule_per_regime(size: int, expected: list[int]) -> None:
    assert hyperrule.schedule(size) == expected


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # warmup starts at zero
        (50, 0.0015),  # half-way through warmup
        (99, 0.003 * 99 / 100),
        (100, 0.003),  # warmup done
        (200, 0.003),  # a decay applies on the step after its boundary, as in the released code
        (201, 0.0003),
        (300, 0.0003),
        (301, 0.00003),
        (401, 0.000003),
        (499, 0.000003),
    ],
)
def test_learning_rate_small_regime(step: int, expected: float) -> None:
    assert hyperrule.learning_rate(step, 1_000) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_learning_rate_stops_at_last_boundary() -> None:
    assert hyperrule.learning_rate(500, 1_000) is None
    assert hyperrule.learning_rate(10_000, 100_000) is None
    assert hyperrule.learning_rate(19_999, 1_000_000) is not None
    assert hyperrule.learning_rate(20_000, 1_000_000) is None


def test_learning_rate_large_regimes() -> None:
    assert hyperrule.learning_rate(250, 100_000) == pytest.approx(0.0015)
    assert hyperrule.learning_rate(500, 100_000) == pytest.approx(0.003)
    assert hyperrule.learning_rate(3001, 100_000) == pytest.approx(0.0003)
    assert hyperrule.learning_rate(9001, 100_000) == pytest.approx(0.000003)
    assert hyperrule.learning_rate(6000, 1_000_000) == pytest.approx(0.003)
    assert hyperrule.learning_rate(12001, 1_000_000) == pytest.approx(0.00003)


def test_learning_rate_explicit_boundaries_and_base_lr() -> None:
    bounds = [10, 20, 30]
    assert hyperrule.learning_rate(5, base_lr=0.1, boundaries=bounds) == pytest.approx(0.05)
    assert hyperrule.learning_rate(21, base_lr=0.1, boundaries=bounds) == pytest.approx(0.01)
    assert hyperrule.learning_rate(30, base_lr=0.1, boundaries=bounds) is None


@pytest.mark.parametrize(
    ("hw", "variant", "expected"),
    [
        ((8, 8), "paper", (160, 128)),
        ((32, 32), "paper", (160, 128)),  # CIFAR
        ((95, 96), "paper", (160, 128)),
        ((96, 96), "paper", (448, 384)),
        ((224, 224), "paper", (448, 384)),
        ((96, 96), "released", (512, 480)),
        ((32, 32), "released", (160, 128)),
    ],
)
def test_resolution_by_area(hw: tuple[int, int], variant: str, expected: tuple[int, int]) -> None:
    assert hyperrule.resolution(*hw, variant=variant) == expected


def test_mixup_on_from_20k() -> None:
    assert hyperrule.mixup_alpha(1_797) == 0.0
    assert hyperrule.mixup_alpha(19_999) == 0.0
    assert hyperrule.mixup_alpha(20_000) == 0.1
    assert hyperrule.mixup_alpha(1_281_167) == 0.1


def test_resolve_defaults_follow_the_paper() -> None:
    hp = hyperrule.resolve(FinetuneConfig(), 50_000, 32 * 32)
    assert hp.boundaries == [500, 3000, 6000, 9000, 10000]
    assert (hp.base_lr, hp.momentum, hp.batch_size, hp.weight_decay) == (0.003, 0.9, 512, 0.0)
    assert (hp.resize, hp.crop, hp.mixup_alpha) == (160, 128, 0.1)
    assert hp.total_steps == 10_000 and hp.accumulation_steps == 1
    assert hp.lr(250) == pytest.approx(0.0015)


def test_resolve_overrides() -> None:
    config = FinetuneConfig(
        steps=100, batch_size=64, micro_batch=16, base_lr=0.03, resize=32, crop=28, mixup_alpha=0.2
    )
    hp = hyperrule.resolve(config, 1_797, 64)
    assert hp.boundaries == [20, 40, 60, 80, 100]
    assert (hp.batch_size, hp.micro_batch, hp.accumulation_steps) == (64, 16, 4)
    assert (hp.resize, hp.crop, hp.mixup_alpha, hp.base_lr) == (32, 28, 0.2, 0.03)
    assert hyperrule.resolve(FinetuneConfig(boundaries=[5, 9]), 1_797, 64).boundaries == [5, 9]
    assert hyperrule.resolve(FinetuneConfig(resolution="released"), 1_797, 96 * 96).crop == 480
    params = hp.as_params()
    assert params["boundaries"] == "20,40,60,80,100" and params["total_steps"] == 100


@pytest.mark.parametrize(
    "kwargs",
    [
        {"boundaries": [100]},
        {"boundaries": [100, 50]},
        {"batch_size": 512, "micro_batch": 100},
        {"resize": 32, "crop": 64},
        {"steps": 2},
    ],
)
def test_resolve_rejects_bad_overrides(kwargs: dict) -> None:
    with pytest.raises(BitrayError):
        hyperrule.resolve(FinetuneConfig(**kwargs), 1_797, 64)


def test_empty_dataset_is_an_error() -> None:
    with pytest.raises(BitrayError, match="empty"):
        hyperrule.schedule(0)
