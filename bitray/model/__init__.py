"""BiT models: the architecture (``bit``), loading weights from a spec (``weights``), TF-Hub export."""

from bitray.model.weights import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
