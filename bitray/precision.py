"""Which compute precision a CPU embedding actor uses, and whether this processor can do it.

``cpu_precision: bfloat16`` builds BiT under Keras' ``mixed_bfloat16`` policy: variables, Group Norm
statistics and weight standardization stay float32 (``bitray.model.bit``), convolutions run in
bfloat16, features come out float32. It needs a processor with bfloat16 instructions (AVX512_BF16 or
AMX-BF16), read from ``/proc/cpuinfo``, and a model that bitray builds itself (``random:``, ``npz:``):
TF-Hub modules and SavedModels are fixed float32 graphs. Imports no TensorFlow: the driver checks here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from bitray.errors import BitrayError

CpuPrecision = Literal["float32", "bfloat16"]
Precision = Literal["float32", "float16", "bfloat16"]
"""What an actor computes in: float16 is the GPU's mixed precision, bfloat16 the CPU's."""
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BUILT_HERE = ("random:", "npz:")
"""Model specs whose Keras model bitray builds layer by layer, so a dtype policy reaches every layer."""


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The first processor's feature flags; empty where there is no ``/proc/cpuinfo`` (macOS, Windows)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_supports_bfloat16(flags: set[str] | None = None) -> bool:
    """AVX512_BF16 or AMX-BF16: oneDNN then runs bfloat16 convolutions natively, not emulated."""
    return any(flag in (cpu_flags() if flags is None else flags) for flag in BF16_FLAGS)


def builds_model(model_spec: str) -> bool:
    """Whether bitray builds this spec's Keras model itself (a dtype policy then reaches every layer)."""
    spec = model_spec.strip()
    return spec.startswith(BUILT_HERE) or spec.lower().endswith(".npz")


def check_cpu_precision(precision: CpuPrecision, model_spec: str) -> None:
    """Refuse ``bfloat16`` for a model it cannot apply to, before a run starts (the driver's check)."""
    if precision == "bfloat16" and not builds_model(model_spec):
        raise BitrayError(
            f"cpu_precision bfloat16 needs a model bitray builds from its weights (npz:... or random:...), "
            f"not {model_spec!r}: TF-Hub modules and SavedModels are float32 graphs. Give the checkpoint "
            "as npz:BiT-S-R101x1.npz, or set cpu_precision: float32"
        )


def require_cpu_bfloat16(flags: set[str] | None = None) -> None:
    """Refuse bfloat16 on a processor without bfloat16 instructions (checked where the actor runs)."""
    if not cpu_supports_bfloat16(flags):
        raise BitrayError(
            "cpu_precision bfloat16 needs a processor with bfloat16 instructions (avx512_bf16 or amx_bf16 "
            "in /proc/cpuinfo), which this Ray node lacks; set cpu_precision: float32"
        )
