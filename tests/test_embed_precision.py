"""``cpu_precision``: checked before a run starts, kept in ``run.json``, and what the actors compute in."""

from __future__ import annotations

import json

import numpy as np
import pytest
from embed_fixtures import read_output, tiny_config, write_photos

from bitray.embed import run_embedding
from bitray.errors import BitrayError
from bitray.precision import cpu_supports_bfloat16


def test_bfloat16_with_a_tf_hub_model_is_refused_before_anything_runs(tmp_path):
    config = tiny_config(
        [str(tmp_path)], str(tmp_path / "out"), model="bit-s-r101x1", cpu_precision="bfloat16"
    )
    with pytest.raises(BitrayError, match="needs a model bitray builds.*npz:BiT-S-R101x1.npz"):
        run_embedding(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not cpu_supports_bfloat16(), reason="this CPU has no avx512_bf16 / amx_bf16")
def test_bfloat16_persists_in_run_json_and_reaches_the_actors(ray_local, tmp_path):
    write_photos(tmp_path / "in", 6, side=48)
    inputs = [str(tmp_path / "in")]
    run_embedding(tiny_config(inputs, str(tmp_path / "f32"), run_id="f32"))
    run_embedding(tiny_config(inputs, str(tmp_path / "bf16"), run_id="bf16", cpu_precision="bfloat16"))
    (params,) = (tmp_path / "bf16").rglob("run.json")
    assert json.loads(params.read_text())["cpu_precision"] == "bfloat16"

    exact, low = (read_output(tmp_path / name)[0].set_index("path").sort_index() for name in ("f32", "bf16"))
    assert list(exact.index) == list(low.index) and len(exact) == 6
    a, b = np.stack(exact.embedding), np.stack(low.embedding)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.99  # tiny measured 0.999 on photos (bench/precision_bench.py)
    assert not np.array_equal(a, b)  # the actors computed in bfloat16, not float32
