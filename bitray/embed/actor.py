"""The model stage: an actor that loads BiT once and turns decoded uint8 pixels into result rows.

An actor keeps nothing between calls: each call maps one block of decoded rows to one block of output
rows (an embedding or a class prediction, or the error carried from the CPU stage, or ``embed`` when
the model gave non-finite outputs). What a result row holds is the head's business (``FeatureHead``,
``ClassHead``), chosen once per actor. Writing files is the next stage's job, so the model never waits
on storage.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from bitray.config import StorageConfig
from bitray.embed.isolation import Attempt, abort_on_colour, model_crash_colour
from bitray.errors import BitrayError
from bitray.precision import Precision, require_cpu_bfloat16

if TYPE_CHECKING:  # the driver imports this module and must not import TensorFlow
    from bitray.model.weights import LoadedModel

log = logging.getLogger(__name__)

PASSED_THROUGH = ("row", "path", "etag", "size", "mtime_ns", "width", "height")
LOG_EVERY_S = 300.0


@dataclass
class ActorTiming:
    """Where an actor's calls spend their time: the model's forward pass, and everything else (result
    columns, masks, conversions). Two clock reads per call; a summary line is logged every
    ``LOG_EVERY_S`` seconds, and ``bench/embed_bench.py --mode actor`` reads it directly."""

    calls: int = 0
    rows: int = 0
    call_s: float = 0.0
    forward_s: float = 0.0
    logged_at: float = field(default_factory=time.monotonic)

    @property
    def outside_share(self) -> float:
        return 1.0 - self.forward_s / self.call_s if self.call_s > 0 else 0.0

    def add(self, rows: int, call_s: float, forward_s: float) -> None:
        self.calls, self.rows = self.calls + 1, self.rows + rows
        self.call_s += call_s
        self.forward_s += forward_s
        if time.monotonic() - self.logged_at >= LOG_EVERY_S:
            self.logged_at = time.monotonic()
            log.info(
                "actor: %d images in %d calls, %.1f s in calls, %.1f%% of it outside the forward pass",
                self.rows, self.calls, self.call_s, 100 * self.outside_share,
            )  # fmt: skip

    def reset(self) -> None:
        self.calls, self.rows, self.call_s, self.forward_s = 0, 0, 0.0, 0.0


class FeatureHead:
    """``task: embed``: the model's features as an ``embedding`` column."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.dim = loaded.feature_dim

    @property
    def width(self) -> int:
        return self.dim

    def columns(self, outputs: np.ndarray, ok: np.ndarray) -> dict[str, pa.Array]:
        flat = pa.array(outputs.reshape(-1), pa.float32())
        return {"embedding": pa.FixedSizeListArray.from_arrays(flat, self.dim, mask=pa.array(~ok))}


class ClassHead:
    """``task: classify``: a classifier's logits as the top label, its probability and the top k."""

    def __init__(self, loaded: LoadedModel, top_k: int) -> None:
        if loaded.num_classes is None:
            raise BitrayError(
                f"{loaded.model_id} has no classifier head; give a fine-tuned classifier's export"
            )
        self.names = np.asarray(
            loaded.class_names or [str(i) for i in range(loaded.num_classes)], dtype=object
        )
        if loaded.class_names is None:
            log.warning("%s does not know its class names: labels are class indices", loaded.model_id)
        self.k = min(top_k, loaded.num_classes)

    @property
    def width(self) -> int:
        return len(self.names)

    def columns(self, outputs: np.ndarray, ok: np.ndarray) -> dict[str, pa.Array]:
        shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.k]
        scores = np.take_along_axis(probabilities, order, axis=1).astype(np.float32)
        mask = pa.array(~ok)
        return {
            "label": pa.array(list(self.names[order[:, 0]]), pa.string(), mask=~ok),
            "score": pa.array(scores[:, 0], pa.float32(), mask=~ok),
            "top_k_labels": pa.ListArray.from_arrays(
                pa.array(np.arange(0, order.size + 1, self.k, dtype=np.int32)),
                pa.array(list(self.names[order].reshape(-1)), pa.string()),
                mask=mask,
            ),
            "top_k_scores": pa.ListArray.from_arrays(
                pa.array(np.arange(0, order.size + 1, self.k, dtype=np.int32)),
                pa.array(scores.reshape(-1), pa.float32()),
                mask=mask,
            ),
        }


class EmbedActor:
    """Runs the model on decoded batches: embeddings (``task: embed``) or class predictions (``classify``)."""

    def __init__(
        self,
        *,
        model_spec: str,
        storage: StorageConfig,
        threads: int,
        precision: Precision = "float32",
        task: str = "embed",
        top_k: int = 5,
        ledger: Any = None,
        model_id: str | None = None,
    ) -> None:
        """``ledger``: a ``CrashLedger`` handle; a batch that killed an actor before runs image by image
        (``bitray.embed.isolation``). ``model_id``: the id of the weights the output's rows carry; a model
        that loads as another is refused before it embeds anything (``bitray.embed.settings``)."""
        configure_tensorflow(threads=threads, precision=precision)
        import tensorflow as tf

        from bitray.model import load_model

        self.loaded = load_model(model_spec, storage=storage, classifier=task == "classify")
        if model_id is not None and self.loaded.model_id != model_id:
            raise BitrayError(
                f"model {model_spec!r} now loads weights {self.loaded.model_id!r}, but the output's rows "
                f"were made with {model_id!r}; one output holds one model's rows: embed into another --output"
            )
        self.head = ClassHead(self.loaded, top_k) if task == "classify" else FeatureHead(self.loaded)
        # Ray retries a call that killed an actor on the same actor, restarted. A first incarnation has
        # seen no crash and leaves the ledger alone (no traffic at all in the usual run); a restarted one
        # registers every batch, so that a batch which kills it again is run image by image next time.
        self.ledger = ledger if _restarted() else None
        self.crash_colour = model_crash_colour()
        model = self.loaded.model
        spec = tf.TensorSpec([None, None, None, 3], tf.uint8)
        # uint8 in, scaled inside the traced graph: no float32 copy of the pixels on the Python side
        self.forward = tf.function(
            lambda images: model(tf.cast(images, tf.float32) * (1 / 255), training=False),
            input_signature=[spec],
        )
        self.timing = ActorTiming()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.perf_counter()
        stage = np.asarray(batch["stage"], dtype=object)
        error = np.asarray(batch["error"], dtype=object)
        ok = np.array([s is None for s in stage], bool)
        rows = batch["row"]
        key = f"model:{rows[0]}:{len(rows)}" if len(rows) else "model:empty"
        attempt = Attempt(self.ledger, key)
        outputs, forward_s = self._run_model(batch, ok, stage, error, attempt.crashed_before)
        bad = ok & ~np.isfinite(outputs).all(axis=1)
        if bad.any():
            stage[bad], error[bad] = "embed", "ValueError: the model gave non-finite outputs"
            ok &= ~bad
        if not ok.all():
            outputs = np.where(ok[:, None], outputs, np.float32(0))
        attempt.close()
        table = pa.table(
            {
                **{name: batch[name] for name in PASSED_THROUGH},
                **self.head.columns(outputs, ok),
                "model": pa.repeat(pa.scalar(self.loaded.model_id, pa.string()), len(ok)),
                "stage": pa.array(stage, pa.string()),
                "error": pa.array(error, pa.string()),
            }
        )
        self.timing.add(len(ok), time.perf_counter() - started, forward_s)
        return table

    def _run_model(
        self,
        batch: dict[str, np.ndarray],
        ok: np.ndarray,
        stage: np.ndarray,
        error: np.ndarray,
        crashed_before: bool,
    ) -> tuple[np.ndarray, float]:
        """The model's outputs for every row (zeros where there is no image) and the seconds it took."""
        if not crashed_before and ok.all():  # the usual batch: no masked copy of the pixels, no zeroing
            started = time.perf_counter()
            return self._forward(batch["pixels"]), time.perf_counter() - started
        outputs = np.zeros((len(ok), self.head.width), np.float32)
        if not ok.any():
            return outputs, 0.0
        started = time.perf_counter()
        if crashed_before:
            self._one_by_one(batch, ok, outputs, stage, error)
        else:
            outputs[ok] = self._forward(batch["pixels"][ok])
        return outputs, time.perf_counter() - started

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        abort_on_colour(pixels, self.crash_colour)  # tests only; nothing when unset
        return np.asarray(self.forward(pixels), np.float32)

    def _one_by_one(
        self,
        batch: dict[str, np.ndarray],
        ok: np.ndarray,
        outputs: np.ndarray,
        stage: np.ndarray,
        error: np.ndarray,
    ) -> None:
        """A batch that killed this (restarted) actor before: each image alone, registered first, so that
        the one that kills it again is known on the next attempt and becomes an error row instead of being
        run once more."""
        log.warning("a batch of %d images killed a model actor before; running it image by image", len(ok))
        for i in np.flatnonzero(ok):
            attempt = Attempt(self.ledger, f"model-row:{batch['row'][i]}")
            if attempt.crashed_before:
                ok[i] = False
                stage[i], error[i] = "embed", "ModelCrashed: the image crashed the model's worker process"
            else:
                outputs[i] = self._forward(batch["pixels"][i : i + 1])[0]
            attempt.close()


def _restarted() -> bool:
    """Whether this actor is a restart of one that died (False outside Ray)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return False  # driven directly, e.g. by a benchmark
    return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def configure_tensorflow(*, threads: int, precision: Precision = "float32") -> None:
    """Size TF's thread pools (not Ray's CPU reservation), grow GPU memory on demand, set the precision.

    ``float16`` is mixed precision on a GPU (ignored where TensorFlow sees none); ``bfloat16`` is mixed
    precision on a CPU with bfloat16 instructions (an error on one without). The policy is global to the
    actor's process and must be set before the model is built.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TF already initialised in this worker process
        log.warning("TensorFlow was initialised before the actor could size its thread pools")
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised: growth was set by then or cannot be
            tf.config.experimental.set_memory_growth(gpu, True)
    import tf_keras

    if precision == "float16" and gpus:
        tf_keras.mixed_precision.set_global_policy("mixed_float16")
    elif precision == "bfloat16":
        require_cpu_bfloat16()
        tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    else:
        tf_keras.mixed_precision.set_global_policy("float32")
