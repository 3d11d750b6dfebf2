"""bitray: BiT (Big Transfer) embeddings and HyperRule fine-tuning on Ray clusters.

tensorflow-hub 0.16 only works with Keras 2 (``tf_keras``). TensorFlow picks its Keras when it is first
imported, so the switch is set here, in the one module that every ``bitray`` import runs first.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
