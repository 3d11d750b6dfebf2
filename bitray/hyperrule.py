"""The BiT HyperRule (Kolesnikov et al. 2020, section 3.3) as pure functions.

Mirrors google-research/big_transfer ``bit_hyperrule.py``: the training-set size picks the step schedule
and MixUp, the image area picks the resolution. SGD with momentum 0.9, base LR 0.003 at batch 512, no
weight decay, a zero-initialised head. ``resolve`` applies a ``FinetuneConfig``'s overrides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from bitray.config import FinetuneConfig
from bitray.errors import BitrayError

BASE_LR = 0.003
MOMENTUM = 0.9
BATCH_SIZE = 512
MIXUP_ALPHA = 0.1
SMALL_IMAGE_AREA = 96 * 96
MIXUP_MIN_EXAMPLES = 20_000

ResolutionVariant = Literal["paper", "released"]
"""``paper``: resize 448, crop 384 (section 3.3); ``released``: the released code's 512/480."""

_LARGE_RESOLUTION: dict[str, tuple[int, int]] = {"paper": (448, 384), "released": (512, 480)}
_SMALL_RESOLUTION = (160, 128)


def resolution(height: int, width: int, variant: ResolutionVariant = "paper") -> tuple[int, int]:
    """``(resize, crop)`` for images of ``height`` x ``width``: small images (area < 96x96) get 160/128."""
    if height <= 0 or width <= 0:
        raise BitrayError(f"image size must be positive to pick a resolution, got {height}x{width}")
    return resolution_for_area(height * width, variant)


def resolution_for_area(area: float, variant: ResolutionVariant = "paper") -> tuple[int, int]:
    """``(resize, crop)`` for images of ``area`` pixels (for a set: the median area of a sample)."""
    if area <= 0:
        raise BitrayError(f"image area must be positive to pick a resolution, got {area}")
    if variant not in _LARGE_RESOLUTION:
        raise BitrayError(f"unknown resolution variant {variant!r}; use 'paper' or 'released'")
    if area < SMALL_IMAGE_AREA:
        return _SMALL_RESOLUTION
    return _LARGE_RESOLUTION[variant]


def schedule(dataset_size: int) -> list[int]:
    """Step boundaries: end of warmup, the decays, and the last step."""
    if dataset_size <= 0:
        raise BitrayError(f"the training set is empty (size {dataset_size}); check the data URI")
    if dataset_size < 20_000:
        return [100, 200, 300, 400, 500]
    if dataset_size < 500_000:
        return [500, 3000, 6000, 9000, 10000]
    return [500, 6000, 12000, 18000, 20000]


def mixup_alpha(dataset_size: int) -> float:
    """MixUp only from 20k training examples on."""
    return MIXUP_ALPHA if dataset_size >= MIXUP_MIN_EXAMPLES else 0.0


def learning_rate(
    step: int, dataset_size: int | None = None, base_lr: float = BASE_LR, boundaries: list[int] | None = None
) -> float | None:
    """The LR at ``step``: linear warmup to the first boundary, then /10 after each further boundary.

    The boundaries are ``schedule(dataset_size)`` unless given. ``None`` from the last boundary on: training
    is over. As in the released code a decay takes effect on the step *after* its boundary.
    """
    if boundaries is None:
        if dataset_size is None:
            raise BitrayError("learning_rate needs a dataset_size or explicit boundaries")
        boundaries = schedule(dataset_size)
    validate_boundaries(boundaries)
    if step < boundaries[0]:
        return base_lr * step / boundaries[0]
    if step >= boundaries[-1]:
        return None
    decays = sum(1 for b in boundaries[1:] if b < step)
    return base_lr / 10**decays


def validate_boundaries(boundaries: list[int]) -> None:
    if len(boundaries) < 2:
        raise BitrayError(f"schedule boundaries {boundaries} need at least a warmup end and a last step")
    if boundaries[0] < 0 or any(b <= a for a, b in zip(boundaries, boundaries[1:], strict=False)):
        raise BitrayError(f"schedule boundaries {boundaries} must be non-negative and strictly increasing")


@dataclass(frozen=True)
class HyperParams:
    """The values one fine-tune uses, as resolved from the rule plus the user's overrides."""

    dataset_size: int
    boundaries: list[int]
    base_lr: float
    momentum: float
    batch_size: int
    micro_batch: int
    mixup_alpha: float
    resize: int
    crop: int
    weight_decay: float = 0.0

    @property
    def total_steps(self) -> int:
        return self.boundaries[-1]

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches summed into one optimizer step, so the global batch stays ``batch_size``."""
        return self.batch_size // self.micro_batch

    def lr(self, step: int) -> float | None:
        return learning_rate(step, base_lr=self.base_lr, boundaries=self.boundaries)

    def as_params(self) -> dict[str, object]:
        """Flat values for logging."""
        params = asdict(self)
        params["boundaries"] = ",".join(str(b) for b in self.boundaries)
        params["total_steps"] = self.total_steps
        params["accumulation_steps"] = self.accumulation_steps
        return params


def resolve(config: FinetuneConfig, dataset_size: int, image_area: float) -> HyperParams:
    """The HyperRule for ``dataset_size`` training images of median area ``image_area``, with the
    config's overrides (its ``None`` fields follow the rule).

    ``config.steps`` alone rescales the rule's boundaries proportionally (e.g. 500 -> 100 steps gives
    [20, 40, 60, 80, 100]); ``config.boundaries`` replaces them outright.
    """
    if config.boundaries is not None:
        bounds = list(config.boundaries)
    else:
        bounds = schedule(dataset_size)
        if config.steps is not None:
            if config.steps < len(bounds):
                raise BitrayError(f"steps {config.steps} is too small; give at least {len(bounds)}")
            bounds = [max(1, round(b * config.steps / bounds[-1])) for b in bounds]
    validate_boundaries(bounds)
    rule_resize, rule_crop = resolution_for_area(image_area, config.resolution)  # type: ignore[arg-type]
    resize = config.resize if config.resize is not None else rule_resize
    crop = config.crop if config.crop is not None else rule_crop
    if crop > resize:
        raise BitrayError(f"crop {crop} is larger than resize {resize}; the random crop must fit inside")
    batch = config.batch_size
    micro = config.micro_batch if config.micro_batch is not None else batch
    if batch <= 0 or micro <= 0 or batch % micro:
        raise BitrayError(f"batch_size {batch} must be a positive multiple of micro_batch {micro}")
    return HyperParams(
        dataset_size=dataset_size,
        boundaries=bounds,
        base_lr=config.base_lr,
        momentum=config.momentum,
        batch_size=batch,
        micro_batch=micro,
        mixup_alpha=config.mixup_alpha if config.mixup_alpha is not None else mixup_alpha(dataset_size),
        resize=resize,
        crop=crop,
    )
