"""The HTTP API (FastAPI behind Ray Serve's proxy): decode in the ingress, models and index behind handles.

    POST /embed      image (raw body, or multipart field ``image``) -> {model, dim, embedding}
    POST /classify   image, ?k= -> {model, labels: [{label, score}, ...]}
    POST /search     image, or JSON {"path": ..., "k": ...} of an indexed object, ?k= ->
                     {neighbours: [{path, similarity, width, height}], labels?: [...]}
    GET  /thumbnail  ?path= of an indexed object -> a small JPEG (404 for any other path)
    GET  /healthz    {status: ok | degraded, model, index?, pending?, problem?}: what is served now
    GET  /config, GET / (the page), GET /static/...

With an index, the app serves one version of it at a time and follows its switches (``bitray.collection``):
the search deployment holds a switch to a version of another model back until the embedding replicas have
loaded that model (``ModelServer.use``), then serves it; meanwhile the old version is served whole. A model
that cannot be loaded keeps the old version served and ``/healthz`` says ``degraded`` and why.

Every refusal is a 4xx with ``{"error": "<one line>"}``; decode failures carry the reason the pipeline's
error rows carry for the same bytes. Nothing here reads a client-given URL or path: ``/search`` by path and
``/thumbnail`` only name objects the index holds, read by the search deployment (``bitray.serve.search``).
"""

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from starlette.exceptions import HTTPException

from bitray.embed.sandbox import DecodeOptions
from bitray.serve.decode import decode_request
from bitray.serve.limits import BadRequest, capped_k, image_bytes, read_body

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
DEFAULT_SIZE = 224

api = FastAPI(title="bitray", docs_url=None, redoc_url=None, openapi_url=None)
api.mount("/static", StaticFiles(directory=STATIC), name="static")


@dataclass(frozen=True)
class Limits:
    """What the ingress enforces per request, and how it decodes without an index (with one: as the index
    served, ``SearchServer.describe``)."""

    exact: bool
    image_size: int | None
    max_bytes: int
    k_max: int
    k_default: int
    max_pixels: int
    max_decode_bytes: int
    follow_s: float = 5.0
    """How often an ingress replica asks the search deployment what it serves (and whether a switch waits)."""


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


@api.exception_handler(BadRequest)
async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
    return _error(exc.status, exc.reason)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__)
    return _error(500, f"internal error ({type(exc).__name__}); see the ingress replica's log")


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    return _error(400, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid request')}")


def _json_query(body: bytes) -> dict:
    """``{"path": "...", "k": 10}``: a query by an indexed object."""
    try:
        query = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(
            400, 'the JSON body is not valid JSON; send {"path": "<indexed path>", "k": 10}'
        ) from None
    if not isinstance(query, dict) or not isinstance(query.get("path"), str) or not query["path"]:
        raise BadRequest(
            400, 'a JSON query needs "path": a path the index holds, e.g. {"path": "s3://b/x.jpg"}'
        )
    return query


@serve.ingress(api)
class Ingress:
    """Parses and decodes; the embedding model, the classifier and the index sit behind handles."""

    def __init__(self, embedder, classifier, searcher, limits: Limits) -> None:  # noqa: ANN001 - handles
        self.embedder, self.classifier, self.searcher, self.limits = embedder, classifier, searcher, limits
        self._described: dict[str, Any] = {}
        self._options: dict[Any, DecodeOptions] = {}
        self._served: dict | None = None
        """The search deployment's ``describe()``: the index and model served, a pending switch."""
        self._looked = 0.0
        self._switching: asyncio.Task | None = None

    async def _index_state(self, fresh: bool = False) -> dict | None:
        """What the search deployment serves (asked at most every ``follow_s``); a pending switch starts
        the load of its model in the background, so requests keep being answered by the old version."""
        if self.searcher is None:
            return None
        if fresh or self._served is None or time.monotonic() - self._looked >= self.limits.follow_s:
            self._looked = time.monotonic()
            self._served = await self.searcher.describe.remote()
        pending = self._served["pending"]
        if pending and self._switching is None:
            self._switching = asyncio.create_task(self._switch(pending))
        return self._served

    async def _switch(self, pending: dict) -> None:
        """Load the pending version's model in an embedding replica, then have the search deployment serve
        that version; or record why the model cannot be loaded, and try again after ``RETRY_S``."""
        from bitray.serve.models import RETRY_S

        try:
            loaded = await self.embedder.use.remote(
                pending["spec"], pending["model"], pending["since"], tuple(pending["image_size"])
            )
            if isinstance(loaded, str):
                log.error("index %s cannot be served: %s", pending["index"], loaded)
                self._served = await self.searcher.refuse.remote(pending["model"], loaded)
                await asyncio.sleep(RETRY_S)
            else:
                self._served = await self.searcher.promote.remote(pending["model"])
        finally:
            self._switching = None

    async def _describe(self, which: str) -> dict:
        if which not in self._described:
            handle = self.embedder if which == "embed" else self.classifier
            self._described[which] = await handle.describe.remote()
        return self._described[which]

    async def _decode_options(self, which: str) -> DecodeOptions:
        """The embedding model decodes as the index served (when there is one), else at ``image_size`` or its
        own size; a classifier at the size it was fine-tuned at (else ``image_size``, else 224)."""
        served = await self._index_state() if which == "embed" else None
        if served is not None:
            key = (tuple(served["image_size"]), served["decode"])
            if key not in self._options:
                self._options[key] = DecodeOptions(
                    key[0], self.limits.max_pixels, self.limits.max_decode_bytes, key[1] == "exact"
                )
            return self._options[key]
        if which not in self._options:
            own = (await self._describe(which))["image_size"]  # a fine-tune's crop, when known
            given = self.limits.image_size
            size = (given or own if which == "embed" else own or given) or DEFAULT_SIZE
            self._options[which] = DecodeOptions(
                (size, size), self.limits.max_pixels, self.limits.max_decode_bytes, self.limits.exact
            )
        return self._options[which]

    async def _pixels(self, data: bytes, which: str) -> np.ndarray:
        options = await self._decode_options(which)
        return await asyncio.to_thread(decode_request, data, options)

    async def _image(self, request: Request) -> bytes:
        body = await read_body(request, self.limits.max_bytes)
        return image_bytes(body, request.headers.get("content-type"))

    async def _embed(self, data: bytes) -> tuple[np.ndarray, str]:
        """The query's vector and the model that made it: the model of the index served, when there is one."""
        pixels = await self._pixels(data, "embed")
        served = self._served if self.searcher is not None else None
        want = (served["spec"], served["model"], served["since"]) if served else None
        return await self.embedder.run.remote(pixels, want)

    async def _labels(self, data: bytes, k: int) -> list[dict]:
        described = await self._describe("classify")
        probabilities, _ = await self.classifier.run.remote(await self._pixels(data, "classify"))
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [{"label": described["labels"][i], "score": round(float(probabilities[i]), 6)} for i in order]

    def _k(self, request: Request, given: Any = None) -> int:  # noqa: ANN401 - JSON or a query string
        value = given if given is not None else request.query_params.get("k")
        return capped_k(value, self.limits.k_default, self.limits.k_max)

    @api.post("/embed")
    async def embed(self, request: Request) -> JSONResponse:
        data = await self._image(request)
        vector, model = await self._embed(data)
        # a JSONResponse as it is: FastAPI's encoder would walk the 2,048 floats one by one (1-2 ms)
        return JSONResponse({"model": model, "dim": len(vector), "embedding": vector.tolist()})

    @api.post("/classify")
    async def classify(self, request: Request) -> dict:
        if self.classifier is None:
            raise BadRequest(404, "no classifier is served; start bitray serve with --classifier SPEC")
        k = self._k(request)
        data = await self._image(request)
        described = await self._describe("classify")
        return {"model": described["model"], "labels": await self._labels(data, k)}

    @api.post("/search")
    async def search(self, request: Request) -> dict:
        if self.searcher is None:
            raise BadRequest(404, "no index is served; start bitray serve with --index URI")
        body = await read_body(request, self.limits.max_bytes)
        content_type = (request.headers.get("content-type") or "").lower()
        if content_type.startswith("application/json"):
            query = _json_query(body)
            k = self._k(request, query.get("k"))
            path = query["path"]
            neighbours = await self.searcher.by_path.remote(path, k)
            if neighbours is None:
                raise BadRequest(
                    404, f"{path[:200]!r} is not in the index; give a path as /search results name it"
                )
            data = await self.searcher.image.remote(path) if self.classifier is not None else None
        else:
            k = self._k(request)
            data = image_bytes(body, request.headers.get("content-type"))
            for fresh in (False, True):  # a query embedded as the app switched models: once more, afresh
                await self._index_state(fresh)
                vector, model = await self._embed(data)
                neighbours = await self.searcher.by_vector.remote(vector, k, model)
                if not isinstance(neighbours, str):
                    break
            else:
                raise BadRequest(503, neighbours)
        answer: dict[str, Any] = {"neighbours": neighbours}
        if self.classifier is not None and isinstance(data, bytes):
            answer["labels"] = await self._labels(data, min(5, k))
        return answer

    @api.get("/thumbnail")
    async def thumbnail(self, path: str = "") -> Response:
        if self.searcher is None or not path:
            raise BadRequest(404, "no such thumbnail; /thumbnail?path= takes a path the index holds")
        jpeg = await self.searcher.thumbnail.remote(path)
        if jpeg is None:
            raise BadRequest(404, f"{path[:200]!r} is not in the index; only indexed objects have thumbnails")
        if isinstance(jpeg, str):
            raise BadRequest(404, f"{path[:200]!r} cannot be read any more: {jpeg}")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """``degraded`` when the index switched to a version whose model cannot be loaded: the old version
        is still served (by path and by image), and ``problem`` says why."""
        served = await self._index_state(fresh=True)
        if served is None:
            return {"status": "ok", "model": (await self._describe("embed"))["model"]}
        return {
            "status": "degraded" if served["problem"] else "ok",
            **{key: served[key] for key in ("model", "index", "pending", "problem")},
        }

    @api.get("/config")
    async def config(self) -> dict:
        """What the page needs to draw itself."""
        served = await self._index_state(fresh=True)
        return {
            "model": served["model"] if served else (await self._describe("embed"))["model"],
            "classifier": (await self._describe("classify"))["model"] if self.classifier else None,
            "index": self.searcher is not None,
            "k_max": self.limits.k_max,
            "k_default": self.limits.k_default,
            "max_bytes": self.limits.max_bytes,
        }

    @api.get("/")
    async def page(self) -> FileResponse:
        return FileResponse(STATIC / "index.html")
