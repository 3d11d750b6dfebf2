"""Model helpers shared by the model test modules."""

from __future__ import annotations

import numpy as np

from bitray.model import LoadedModel, load_model


def random_head_classifier(num_classes: int) -> LoadedModel:
    """random:tiny with a head whose weights are not zero, so that losing or loading the head shows."""
    loaded = load_model("random:tiny", num_classes=num_classes, trainable=True)
    head = loaded.model.get_layer("head/conv2d")
    rng = np.random.default_rng(1)
    head.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in head.get_weights()])
    return loaded
