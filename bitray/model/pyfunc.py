"""The pyfunc face of a fine-tuned model (``BitClassifier``), its signature, and logging it to a run.

MLflow pickles the ``BitClassifier`` instance by reference to this module; models logged before
this module existed name ``bitray.tracking.BitClassifier``, which ``bitray.tracking`` still answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitray.model.registry import CLASSIFIER, FEATURE_VECTOR


def log_final_model(
    tracking_uri: str,
    run_id: str,
    feature_dir: Path,
    classifier_dir: Path,
    example: Any,
) -> str:
    """Log both SavedModels as one pyfunc model in the run, with a signature and ``example`` (float32
    images ``[b, h, w, 3]`` in [0, 1]) as its input example; returns the model URI."""
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=BitClassifier(),
            artifacts={FEATURE_VECTOR: str(feature_dir), CLASSIFIER: str(classifier_dir)},
            pip_requirements=["bitray", "tensorflow", "tensorflow-hub", "tf-keras"],
            signature=classifier_signature(),
            input_example=example,
        )
    return info.model_uri


try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    PythonModel = object  # type: ignore[misc,assignment]


TOP_K = 5


def classifier_signature():  # noqa: ANN201 - mlflow.models.ModelSignature
    """Images in, per image the best label and score plus the top-k labels and probabilities out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, 3))]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("double", "score"),
                ColSpec(Array("string"), "top_k_labels"),
                ColSpec(Array("double"), "top_k_scores"),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", "long", TOP_K)]),
    )


class BitClassifier(PythonModel):
    """pyfunc face of a fine-tuned model: float32 images ``[b, h, w, 3]`` in [0, 1] -> per image, ``label``
    and ``score`` (the most probable class and its softmax probability) and the ``top_k`` (param,
    default 5) ``top_k_labels`` with their ``top_k_scores``. Class names come from the classifier
    SavedModel's ``labels.txt`` (``class_<i>`` when it has none)."""

    def load_context(self, context) -> None:  # noqa: ANN001 - mlflow's context type
        import tensorflow as tf  # bitray (imported with this module) selected Keras 2 already

        from bitray.model.weights import read_class_names

        directory = Path(context.artifacts[CLASSIFIER])
        self._model = tf.saved_model.load(str(directory))
        self._classes = read_class_names(directory)

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        import numpy as np
        import pandas as pd
        import tensorflow as tf

        logits = self._model(tf.constant(np.asarray(model_input, np.float32))).numpy()
        probabilities = tf.nn.softmax(logits, axis=-1).numpy()
        classes = self._classes or [f"class_{i}" for i in range(logits.shape[1])]
        k = min(int((params or {}).get("top_k", TOP_K)), logits.shape[1])
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return pd.DataFrame(
            {
                "label": [classes[row[0]] for row in order],
                "score": [float(p[row[0]]) for p, row in zip(probabilities, order, strict=True)],
                "top_k_labels": [[classes[i] for i in row] for row in order],
                "top_k_scores": [
                    [float(p[i]) for i in row] for p, row in zip(probabilities, order, strict=True)
                ],
            }
        )
