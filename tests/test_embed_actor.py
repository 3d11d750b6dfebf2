"""The model stage on its own, in this process: result rows for decoded and errored inputs, and its timing."""

from __future__ import annotations

import numpy as np
import pytest

from bitray.config import StorageConfig

SIZE = 32


@pytest.fixture(scope="module")
def actor():
    from bitray.embed.actor import EmbedActor

    return EmbedActor(model_spec="random:tiny", storage=StorageConfig(), threads=2)


def decoded_batch(stages: list[str | None]) -> dict[str, np.ndarray]:
    """What Ray Data hands the actor: numpy columns of a decoded block."""
    n = len(stages)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, stage in enumerate(stages):
        if stage is not None:
            pixels[i] = 0  # errored rows travel with zero pixels
    return {
        "row": np.arange(n, dtype=np.int64),
        "path": np.array([f"/in/{i}.jpg" for i in range(n)], dtype=object),
        "etag": np.array([None] * n, dtype=object),
        "size": np.full(n, 100, np.int64),
        "mtime_ns": np.full(n, 7, np.int64),
        "width": np.full(n, 40, np.int32),
        "height": np.full(n, 30, np.int32),
        "stage": np.array(stages, dtype=object),
        "error": np.array([None if s is None else f"{s} failed" for s in stages], dtype=object),
        "pixels": pixels,
    }


def expected_embeddings(actor, pixels: np.ndarray) -> np.ndarray:  # noqa: ANN001
    return actor.loaded.model(pixels.astype(np.float32) * np.float32(1 / 255)).numpy()


@pytest.mark.parametrize("stages", [[None, None, None], [None, "decode", None, "read"]])
def test_rows_carry_embeddings_or_the_stage_error(actor, stages) -> None:  # noqa: ANN001
    batch = decoded_batch(stages)
    before = (actor.timing.calls, actor.timing.rows)
    table = actor(batch)
    assert table.column("path").to_pylist() == list(batch["path"])
    assert table.column("stage").to_pylist() == stages
    ok = np.array([s is None for s in stages])
    embeddings = table.column("embedding")
    assert [e is None for e in embeddings.to_pylist()] == list(~ok)
    got = np.stack([np.asarray(e, np.float32) for e in embeddings.to_pylist() if e is not None])
    np.testing.assert_allclose(got, expected_embeddings(actor, batch["pixels"][ok]), atol=1e-5)
    assert set(table.column("model").to_pylist()) == {actor.loaded.model_id}
    assert (actor.timing.calls, actor.timing.rows) == (before[0] + 1, before[1] + len(stages))
    assert 0 < actor.timing.forward_s <= actor.timing.call_s


def test_a_batch_without_decoded_images_skips_the_model(actor) -> None:  # noqa: ANN001
    actor.timing.reset()
    table = actor(decoded_batch(["decode", "read"]))
    assert table.column("embedding").null_count == 2 and actor.timing.forward_s == 0.0
    assert actor.timing.calls == 1
