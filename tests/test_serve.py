"""``bitray serve``: the Ray Serve application on real Ray and real Serve, over HTTP on 127.0.0.1.

One application serves the whole module (starting Serve costs seconds): random:tiny at 32 px with an
index of a small embedding output, and a tiny fine-tuned classifier export. The output's inputs hold one
bad file of each kind, so its error rows say what the API must answer for the same bytes. The app is given
the output's root, so it follows the root's switches: a second version, embedded by another model (an
export of random:tiny with other weights) before the app starts, is switched to by the last test.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import requests
from cluster_fixtures import free_port
from embed_fixtures import read_output, tiny_config, write_photos
from PIL import Image

pytestmark = pytest.mark.slow

MAX_BYTES = 60_000
MAX_PIXELS = 100_000
MAX_DECODE_MB = 1
K_MAX = 5
FOLLOW_S = 0.5
OTHER_MODEL_ID = "bit-tiny@other"


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, "PNG")
    return out.getvalue()


def bad_files() -> dict[str, bytes]:
    """One input per refusal the pipeline records as an error row."""
    rng = np.random.default_rng(5)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    return {
        "not-an-image.jpg": b"<!DOCTYPE html><html>nope</html>",
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "too-many-pixels.png": _png(np.zeros((400, 400, 3), np.uint8)),  # 160,000 > MAX_PIXELS
        "decode-memory.png": _png(np.zeros((300, 300, 2), np.uint8), "LA"),  # ~2.3 MB through RGBA
        "too-large.png": _png(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)),  # > MAX_BYTES
    }


def other_model(directory) -> str:  # noqa: ANN001 - a Path
    """An export of random:tiny with other stem weights: other vectors, another model id."""
    from dataclasses import replace

    from bitray.model import load_model
    from bitray.model.export import export_savedmodel

    loaded = load_model("random:tiny")
    stem = next(layer for layer in loaded.model.layers if layer.get_weights())
    rng = np.random.default_rng(2)
    stem.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in stem.get_weights()])
    export_savedmodel(replace(loaded, model_id=OTHER_MODEL_ID), directory)
    return f"savedmodel:{directory}"


@pytest.fixture(scope="module")
def app(tmp_path_factory, ray_local):
    """The base URL of the running app, and what it serves."""
    from model_fixtures import random_head_classifier
    from ray import serve

    from bitray.collection import Collection
    from bitray.embed import run_embedding
    from bitray.model.export import export_savedmodel
    from bitray.search.index import update_index
    from bitray.serve.app import build
    from bitray.serve.config import ServeConfig

    root = tmp_path_factory.mktemp("serve")
    photos = write_photos(root / "photos", 6)
    for name, data in bad_files().items():
        (root / "photos" / name).write_bytes(data)
    output = root / "out"
    run_embedding(
        tiny_config(
            [str(root / "photos")], str(output),
            max_pixels=MAX_PIXELS, max_decode_mb=MAX_DECODE_MB, max_bytes=MAX_BYTES,
        )
    )  # fmt: skip
    update_index(str(output))
    other = other_model(root / "other-model")
    more = write_photos(root / "more", 1, seed=9)  # only the second version holds it
    v2 = Collection(str(output)).add("v2", model=other).uri
    run_embedding(
        tiny_config(
            [str(root / "photos"), str(root / "more")], v2, model=other,
            max_pixels=MAX_PIXELS, max_decode_mb=MAX_DECODE_MB, max_bytes=MAX_BYTES,
        )
    )  # fmt: skip
    classifier = random_head_classifier(3)
    classifier.class_names = ["cat", "dog", "owl"]
    export_savedmodel(classifier, root / "classifier", classifier=True)
    config = ServeConfig(
        index=str(output),  # the root: its current version's index
        follow_s=FOLLOW_S,
        classifier=f"savedmodel:{root / 'classifier'}",
        port=free_port(),
        replicas_max=1,
        batch_size=4,
        max_bytes=MAX_BYTES,
        max_pixels=MAX_PIXELS,
        max_decode_mb=MAX_DECODE_MB,
        k_max=K_MAX,
    )
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(build(config), name="bitray", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{config.port}", "photos": photos, "output": output, "root": root,
               "v2": v2, "more": more}  # fmt: skip
    finally:
        serve.shutdown()


def test_embed_gives_the_bulk_vector(app):
    embeddings, _ = read_output(app["output"])
    rows = dict(zip(embeddings["path"], embeddings["embedding"], strict=True))
    for i, photo in enumerate(app["photos"][:3]):
        data = photo.read_bytes()
        if i % 2:
            reply = requests.post(f"{app['url']}/embed", files={"image": ("x.jpg", data)}, timeout=60)
        else:
            reply = requests.post(f"{app['url']}/embed", data=data, timeout=60)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        served, bulk = np.asarray(body["embedding"]), np.asarray(rows[str(photo)])
        assert body["model"] == embeddings["model"][0] and body["dim"] == len(bulk)
        assert served @ bulk / np.linalg.norm(served) / np.linalg.norm(bulk) >= 0.999


def test_search_by_image_and_by_path(app):
    photo = app["photos"][0]
    reply = requests.post(f"{app['url']}/search?k=3", data=photo.read_bytes(), timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    first = body["neighbours"][0]
    assert first["path"] == str(photo) and first["similarity"] >= 0.999
    assert (first["width"], first["height"]) == Image.open(photo).size
    assert len(body["neighbours"]) == 3
    assert [label["label"] for label in body["labels"]] and body["labels"][0]["label"] in {
        "cat",
        "dog",
        "owl",
    }

    reply = requests.post(f"{app['url']}/search", json={"path": str(photo), "k": 100}, timeout=60)
    assert reply.status_code == 200, reply.text
    neighbours = reply.json()["neighbours"]
    assert len(neighbours) == K_MAX and str(photo) not in [n["path"] for n in neighbours]  # k capped
    assert {n["path"] for n in neighbours} <= {str(p) for p in app["photos"]}

    unknown = requests.post(f"{app['url']}/search", json={"path": "/etc/passwd"}, timeout=60)
    assert unknown.status_code == 404 and "not in the index" in unknown.json()["error"]
    broken = requests.post(
        f"{app['url']}/search", data=b"{nope", headers={"Content-Type": "application/json"}, timeout=60
    )
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]


def test_thumbnails_only_for_indexed_paths(app):
    photo = app["photos"][1]
    reply = requests.get(f"{app['url']}/thumbnail", params={"path": str(photo)}, timeout=60)
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(reply.content)).format == "JPEG"
    outside = app["root"] / "secret.jpg"
    outside.write_bytes(photo.read_bytes())
    for path in (str(outside), "/etc/passwd", str(app["root"] / "photos" / "not-an-image.jpg"), ""):
        refused = requests.get(f"{app['url']}/thumbnail", params={"path": path}, timeout=60)
        assert refused.status_code == 404 and refused.json()["error"], path


def test_classify_top_k(app):
    data = app["photos"][2].read_bytes()
    reply = requests.post(f"{app['url']}/classify?k=2", data=data, timeout=60)
    assert reply.status_code == 200, reply.text
    labels = reply.json()["labels"]
    assert len(labels) == 2 and {entry["label"] for entry in labels} <= {"cat", "dog", "owl"}
    assert labels[0]["score"] >= labels[1]["score"] and sum(entry["score"] for entry in labels) <= 1.0001
    assert len(requests.post(f"{app['url']}/classify?k=99", data=data, timeout=60).json()["labels"]) == 3
    zero = requests.post(f"{app['url']}/classify?k=0", data=data, timeout=60)
    assert zero.status_code == 400 and "k=0" in zero.json()["error"]


def test_bad_images_get_the_pipelines_reasons(app):
    _, errors = read_output(app["output"])
    recorded = dict(zip(errors["path"], errors["error"], strict=True))
    for name, data in bad_files().items():
        reply = requests.post(f"{app['url']}/embed", data=data, timeout=60)
        assert 400 <= reply.status_code < 500, (name, reply.status_code, reply.text)
        reason, row = reply.json()["error"], recorded[str(app["root"] / "photos" / name)]
        if name == "too-large.png":  # the pipeline names the object, the API the request body
            assert reply.status_code == 413 and reason.split(" is ")[-1] == row.split(" is ")[-1], (
                reason,
                row,
            )
        else:
            assert reply.status_code == 400 and reason == row, (reason, row)
    empty = requests.post(f"{app['url']}/embed", data=b"", timeout=60)
    assert empty.status_code == 400 and "empty" in empty.json()["error"]
    no_field = requests.post(f"{app['url']}/embed", files={"photo": ("x.jpg", b"abc")}, timeout=60)
    assert no_field.status_code == 400 and "'image'" in no_field.json()["error"]


def test_oversize_bodies_are_refused_before_being_read(app):
    big = b"\xff" * (MAX_BYTES * 4)
    declared = requests.post(f"{app['url']}/embed", data=big, timeout=60)
    assert declared.status_code == 413 and "max_bytes" in declared.json()["error"]
    chunked = requests.post(f"{app['url']}/embed", data=iter([big[:40_000]] * 4), timeout=60)  # no length
    assert chunked.status_code == 413 and "max_bytes" in chunked.json()["error"]


def test_health_config_and_page(app):
    health = requests.get(f"{app['url']}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["index"] == str(app["output"] / "_index")
    assert health["model"].startswith("bit-tiny") and not health["pending"] and not health["problem"]
    config = requests.get(f"{app['url']}/config", timeout=30).json()
    assert config["index"] is True and config["classifier"] and config["k_max"] == K_MAX
    assert config["model"].startswith("bit-tiny")
    page = requests.get(f"{app['url']}/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert requests.get(f"{app['url']}/static/index.html", timeout=30).status_code == 200
    missing = requests.get(f"{app['url']}/nope", timeout=30)
    assert missing.status_code == 404 and json.loads(missing.text)["error"]


def test_serve_without_a_model_or_index_is_refused(capsys):
    from bitray.cli import main

    assert main(["serve"]) == 2
    assert "nothing to serve" in capsys.readouterr().err


def test_write_config_gives_a_serve_deploy_file(tmp_path, capsys):
    """The file validates against Serve's own schema and names the builder with these settings."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from bitray.cli import main

    target = tmp_path / "serve.yaml"
    code = main(["serve", "--model", "random:tiny", "--host", "0.0.0.0", "--port", "8123", "--k-max", "7",
                 "--write-config", str(target)])  # fmt: skip
    assert code == 0
    assert "warning: binding 0.0.0.0" in capsys.readouterr().err
    deploy = ServeDeploySchema.model_validate(yaml.safe_load(target.read_text()))
    assert (deploy.http_options.host, deploy.http_options.port) == ("0.0.0.0", 8123)
    [application] = deploy.applications
    assert application.import_path == "bitray.serve.app:build"
    assert application.args == {"model": "random:tiny", "k_max": 7}


def test_a_compressed_index_is_searched_through_the_search_service(app, tmp_path):
    """The search deployment's class on an ``ivfpq`` index: queries go to ``SearchService``'s actors."""
    from bitray.search.index import IndexOptions, update_index
    from bitray.search.service import SearchService
    from bitray.search.synthetic import Realistic, batches_of, write_run
    from bitray.serve.search import SearchServer

    vectors, _ = Realistic(64, rank=16, clusters=20, seed=3).draw(2000, np.random.default_rng(3))
    paths = [f"/photos/{i:05d}.jpg" for i in range(2000)]
    write_run(str(tmp_path / "out"), "a", batches_of(paths, vectors, 500), rows_per_file=500)
    options = IndexOptions(exact_below=100, max_index_memory=2000 * 48, files_per_shard=2)
    assert update_index(str(tmp_path / "out"), str(tmp_path / "index"), options=options).kind == "ivfpq"
    server = SearchServer(str(tmp_path / "index"))
    try:
        assert isinstance(server.index, SearchService) and server.describe()["kind"] == "ivfpq"
        exact = np.argsort(-(vectors @ vectors[7]), kind="stable")[1:6]
        found = [n["path"] for n in server.by_path(paths[7], 5)]
        assert len(found) == 5 and paths[7] not in found
        assert len(set(found) & {paths[i] for i in exact}) >= 3  # compressed: most of the exact top 5
        assert server.by_vector(vectors[7], 1)[0]["path"] == paths[7]
        assert server.by_path("/etc/passwd", 5) is None and server.thumbnail("/etc/passwd") is None
    finally:
        server.index.stop()


def test_a_model_other_than_the_indexs_is_refused():
    """Vectors of other weights would not be comparable with the index's: the replica refuses to start."""
    from bitray.errors import BitrayError
    from bitray.serve.models import ModelServer

    with pytest.raises(BitrayError, match="the index holds vectors of 'bit-r50x1@random-init'"):
        ModelServer("random:tiny", task="embed", threads=1, expect_model_id="bit-r50x1@random-init")


def bulk_vector(output, photo) -> np.ndarray:  # noqa: ANN001 - paths
    embeddings, _ = read_output(output)
    return np.asarray(dict(zip(embeddings["path"], embeddings["embedding"], strict=True))[str(photo)])


def cosine(a, b) -> float:  # noqa: ANN001 - vectors
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_the_app_follows_a_switch_to_another_models_version_without_a_restart(app):
    """Switched to a version embedded by another model, the app loads that model and then serves the
    version: search by image answers throughout (the old version until the new model is loaded), and a
    version whose model cannot be loaded leaves the app on the one it serves, degraded and saying why."""
    from bitray.collection import Collection
    from bitray.promote import promote
    from bitray.search.synthetic import batches_of, write_run

    url, photo, root = app["url"], app["photos"][0], str(app["output"])

    def search_by_image() -> dict:
        reply = requests.post(f"{url}/search?k=2", data=photo.read_bytes(), timeout=60)
        assert reply.status_code == 200, reply.text  # never a refusal while the app switches
        first = reply.json()["neighbours"][0]
        assert first["path"] == str(photo) and first["similarity"] >= 0.999  # query and index: one model
        return first

    def health() -> dict:
        return requests.get(f"{url}/healthz", timeout=30).json()

    search_by_image()
    promote(root, "v2")  # indexes v2, then switches
    deadline = time.monotonic() + 60
    while health()["model"] != OTHER_MODEL_ID:
        search_by_image()
        assert time.monotonic() < deadline, health()
    assert health() == {"status": "ok", "model": OTHER_MODEL_ID, "index": f"{app['v2']}/_index",
                        "pending": None, "problem": None}  # fmt: skip
    assert requests.get(f"{url}/config", timeout=30).json()["model"] == OTHER_MODEL_ID
    search_by_image()
    embedded = requests.post(f"{url}/embed", data=photo.read_bytes(), timeout=60).json()
    assert embedded["model"] == OTHER_MODEL_ID
    new, old = (bulk_vector(output, photo) for output in (app["v2"], app["output"]))
    assert cosine(embedded["embedding"], new) >= 0.999 and cosine(new, old) < 0.99  # the other model's
    more = str(app["more"][0])
    reply = requests.post(f"{url}/search", json={"path": more, "k": 1}, timeout=60)
    assert reply.status_code == 200 and reply.json()["neighbours"], reply.text  # only v2 holds it

    # v3 records a model its spec no longer loads (random:tiny gives bit-tiny@random-init)
    v3 = Collection(root).add("v3").uri
    paths = [f"/elsewhere/{i}.jpg" for i in range(4)]
    write_run(v3, "c", batches_of(paths, np.eye(4, 8, dtype=np.float32), 4), model_id="bit-tiny@gone")
    promote(root, "v3")
    deadline = time.monotonic() + 60
    while health()["status"] != "degraded":
        search_by_image()
        assert time.monotonic() < deadline, health()
    degraded = health()
    assert degraded["model"] == OTHER_MODEL_ID and degraded["pending"]["model"] == "bit-tiny@gone"
    assert "cannot be served" in degraded["problem"] and "bit-tiny@gone" in degraded["problem"]
    search_by_image()  # v2 still served whole
    assert requests.post(f"{url}/search", json={"path": more, "k": 1}, timeout=60).status_code == 200
