"""BiT models: the architecture (``bit``), loading weights from a spec (``weights``), TF-Hub export
(``export``), the MLflow registry (``registry``) and the pyfunc of a fine-tuned model (``pyfunc``).

``load_model`` and ``LoadedModel`` are imported on first use, so that ``bitray.model.registry`` (resolving
a ``models:/`` alias, e.g. in the scheduler) does not import TensorFlow.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LoadedModel", "load_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bitray.model import weights

        return getattr(weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
