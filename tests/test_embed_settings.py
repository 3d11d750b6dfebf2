"""One output, one model: incremental and retry runs take the output's model, image size, decode, CPU
precision and task, and are refused when they ask for others; readers refuse outputs already mixed by an
older bitray; a ``models:/NAME@ALIAS`` run records and loads one version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from embed_fixtures import snapshot, tiny_config, write_photos

from bitray.cli import main
from bitray.errors import BitrayError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_output(tmp_path_factory, ray_local) -> dict:
    """An output of two finished runs with random:tiny at 32 px: a first run and an incremental one;
    one photo is undecodable (an open error to retry)."""
    from bitray.embed import run_embedding

    root = tmp_path_factory.mktemp("settings")
    photos = root / "in"
    write_photos(photos, 3)
    good = write_photos(root / "spare", 1, seed=9)[0].read_bytes()
    (photos / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated: an open error
    output = root / "out"
    run_embedding(tiny_config([str(photos)], str(output), run_id="first"))
    write_photos(photos, 2, seed=1)
    run_embedding(tiny_config([str(photos)], str(output), run_id="second", incremental=True))
    return {"root": root, "photos": photos, "output": output}


def run_json(output: Path, run_id: str) -> dict:
    return json.loads((output / "_bitray" / "runs" / run_id / "run.json").read_text())


@pytest.mark.parametrize(
    ("flags", "asked", "recorded"),
    [
        (["--model", "random:r50x1"], "--model random:r50x1", "random:tiny"),
        (["--model", "random:tiny", "--image-size", "40"], "--image-size 40x40 px", "32x32 px"),
        (["--model", "random:tiny", "--decode", "exact"], "--decode exact", "fast"),
    ],
)
def test_incremental_run_asking_for_other_settings_is_refused(
    tiny_output, tmp_path, capsys, flags, asked, recorded
):
    output = tmp_path / "out"
    shutil.copytree(tiny_output["output"], output)
    write_photos(tiny_output["photos"].parent / "new", 2, seed=5)
    before = snapshot(output)
    argv = ["embed", "--input", str(tiny_output["photos"].parent / "new"), "--output", str(output)]
    assert main([*argv, "--incremental", *flags]) == 2
    err = capsys.readouterr().err
    assert f"{asked} (the output's rows were made with {recorded})" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert snapshot(output) == before  # nothing planned, nothing written
    pd.read_parquet(output / "embeddings")  # still one vector length: readable as one table


def test_retry_without_model_takes_the_outputs_model_and_size(tiny_output, tmp_path, capsys):
    """What `bitray errors` suggests: no --model, no --image-size."""
    output = tmp_path / "out"
    shutil.copytree(tiny_output["output"], output)
    assert main(["embed", "--output", str(output), "--retry-errors", "--run-id", "retry"]) == 0
    params = run_json(output, "retry")
    assert (params["model"], params["image_size"], params["decode"]) == ("random:tiny", [32, 32], "fast")
    assert params["model_id"] == "bit-tiny@random-init"
    frame = pd.read_parquet(output / "embeddings")  # one model, one vector length
    assert set(frame.model) == {"bit-tiny@random-init"} and frame.embedding.map(len).nunique() == 1
    # a dry run of the same takes the output's model too
    assert main(["embed", "--output", str(output), "--retry-errors", "--dry-run"]) == 0
    assert "random:tiny (1024-d embeddings)" in capsys.readouterr().out


def test_readers_refuse_an_output_mixed_by_an_older_bitray(tiny_output, tmp_path, capsys):
    from bitray import outputs
    from bitray.embed import run_embedding
    from bitray.search.evaluate import load_labelled_vectors
    from bitray.search.index import update_index

    output = tmp_path / "out"
    shutil.copytree(tiny_output["output"], output)
    # what bitray before this check wrote for `--incremental --decode exact`: a run that decoded another
    # way, and a state that does not record the output's settings
    params = run_json(output, "second")
    params["decode"] = "exact"
    (output / "_bitray" / "runs" / "second" / "run.json").write_text(json.dumps(params))
    current = output / "_bitray" / "state" / "current.json"
    state = json.loads(current.read_text())
    state.pop("settings", None)
    current.write_text(json.dumps(state))

    message = r"mixes rows made differently: decode fast \(run first\); decode exact \(run second\)"
    with pytest.raises(BitrayError, match=message):
        update_index(str(output), str(tmp_path / "index"))
    labels = tmp_path / "labels.csv"
    photos = sorted(tiny_output["photos"].glob("img-*"))
    labels.write_text("path,label\n" + "".join(f"{p},{'ab'[i % 2]}\n" for i, p in enumerate(photos)))
    with pytest.raises(BitrayError, match=message):
        load_labelled_vectors(str(output), str(labels))
    assert main(["index", "--embeddings", str(output), "--index", str(tmp_path / "index")]) == 2
    assert "mixes rows made differently" in capsys.readouterr().err
    with pytest.raises(BitrayError, match=message):
        outputs.settings(str(output))
    with pytest.raises(BitrayError, match=message):  # and no run adds to it
        run_embedding(tiny_config([str(tiny_output["photos"])], str(output), incremental=True))


def test_actors_refuse_a_model_that_loads_as_another_id(tiny_output, tmp_path):
    """Same spec, other weights (e.g. a SavedModel directory replaced): refused before anything is kept."""
    from bitray.embed import run_embedding

    output = tmp_path / "out"
    shutil.copytree(tiny_output["output"], output)
    current = output / "_bitray" / "state" / "current.json"
    state = json.loads(current.read_text())
    assert state["settings"]["model_id"] == "bit-tiny@random-init"
    state["settings"]["model_id"] = "bit-tiny@other-weights"
    current.write_text(json.dumps(state))
    write_photos(tiny_output["root"] / "more", 1, seed=6)
    config = tiny_config([str(tiny_output["root"] / "more")], str(output), incremental=True, run_id="third")
    with pytest.raises(BitrayError, match="now loads weights 'bit-tiny@random-init', but the output's rows"):
        run_embedding(config)
    assert not (output / "_bitray" / "runs" / "third").exists()
    assert not any("third" in p.name for p in (output / "embeddings").iterdir())


@pytest.fixture()
def registry(mlflow_tracking_uri, tmp_path) -> dict:
    """A real MLflow sqlite registry holding model ``tiny`` in two versions of other weights (model ids),
    alias ``champion`` on version 1."""
    import numpy as np
    from model_fixtures import random_head_classifier

    from bitray import tracking
    from bitray.model.export import export_savedmodel
    from bitray.model.pyfunc import log_final_model
    from bitray.model.registry import CLASSIFIER, FEATURE_VECTOR, register_version, set_alias
    from bitray.model.weights import METADATA_FILE

    loaded = random_head_classifier(2)
    first = tmp_path / "exports" / "1"
    export_savedmodel(loaded, first / FEATURE_VECTOR)
    export_savedmodel(loaded, first / CLASSIFIER, classifier=True)
    ids = {}
    for version in ("1", "2"):  # version 2: the same export saying other weights, as a new fine-tune would
        directory = tmp_path / "exports" / version
        if version != "1":
            shutil.copytree(first, directory)
        ids[version] = f"bit-tiny@finetune-v{version}"
        for part in (FEATURE_VECTOR, CLASSIFIER):
            meta = directory / part / METADATA_FILE
            meta.write_text(json.dumps({**json.loads(meta.read_text()), "model_id": ids[version]}))
        run_id, _ = tracking.start_or_resume_run(mlflow_tracking_uri, "exp", f"tune-{version}", "/runs")
        example = np.zeros((1, 32, 32, 3), np.float32)
        parts = directory / FEATURE_VECTOR, directory / CLASSIFIER
        uri = log_final_model(mlflow_tracking_uri, run_id, *parts, example)
        assert register_version(mlflow_tracking_uri, uri, "tiny", {}) == version
    set_alias(mlflow_tracking_uri, "tiny", "champion", "1")
    return {"uri": mlflow_tracking_uri, "ids": ids}


def test_an_alias_is_resolved_once_to_the_version_the_run_records_and_loads(registry, tmp_path):
    from bitray.config import EmbedConfig, StorageConfig
    from bitray.embed.actor import EmbedActor
    from bitray.embed.layout import OutputLayout
    from bitray.embed.params import RunParams
    from bitray.embed.plan import start_run
    from bitray.embed.state import IncrementalState, record_run
    from bitray.model.registry import set_alias

    photos = tmp_path / "in"
    write_photos(photos, 2)
    layout = OutputLayout(str(tmp_path / "out"), StorageConfig())
    config = tiny_config([str(photos)], layout.output, model="models:/tiny@champion")
    params = start_run(config, layout, "first", IncrementalState())
    assert (
        params.model == "models:/tiny/1" and run_json(tmp_path / "out", "first")["model"] == "models:/tiny/1"
    )

    set_alias(registry["uri"], "tiny", "champion", "2")  # the alias moves mid-run
    resumed = RunParams.load(layout, "first")  # what the actors and a resume load
    actor = EmbedActor(model_spec=resumed.model, storage=layout.storage, threads=1, model_id=resumed.model_id)
    assert actor.loaded.model_id == registry["ids"]["1"]

    layout.write_summary("first", {"model_id": actor.loaded.model_id})  # as the driver records a finished run
    state = record_run(layout, IncrementalState(), resumed)
    assert state.settings.model == "models:/tiny/1" and state.settings.model_id == registry["ids"]["1"]

    # an incremental run asking for the alias, which names version 2 now: refused, naming both
    write_photos(photos, 1, seed=4)
    incremental = config.model_copy(update={"incremental": True})
    with pytest.raises(BitrayError) as refused:
        start_run(incremental, layout, "second", state)
    assert (
        "--model models:/tiny@champion (now models:/tiny/2) (the output's rows were made with models:/tiny/1)"
        in str(refused.value)
    )
    # without --model it takes the output's version, and its actors refuse other weights
    unnamed = EmbedConfig(inputs=[str(photos)], output=layout.output, incremental=True)  # no model, no size
    params = start_run(unnamed, layout, "second", state)
    assert (params.model, params.model_id, params.image_size) == (
        "models:/tiny/1",
        registry["ids"]["1"],
        (32, 32),
    )
    with pytest.raises(BitrayError, match="now loads weights 'bit-tiny@finetune-v2', but the output's rows"):
        EmbedActor(model_spec="models:/tiny/2", storage=layout.storage, threads=1, model_id=params.model_id)
