"""`lakelens serve`: the similarity index over HTTP (FastAPI), and the web page at `/`.

Endpoints (JSON; OpenAPI at /docs):
  GET  /search?image_id=ID   neighbours of an indexed image
  POST /search/vector        {"vectors": [[...]], ...} or {"vector": [...], ...}
  POST /search/image         multipart upload(s) named `image`, embedded by the index's embedder
  GET  /images/{image_id}    the image, resized (?size=), with ?overlay=1 what the models saw
  GET  /labels               labels (and semantic regions) in the table, images with each
  GET  /browse?<filters>     the images that pass the filters, no query: ?offset=&limit= pages them
  GET  /images/{image_id}/duplicates   its near-duplicate group (?threshold=, cosine)
  GET  /health, GET /stats
  GET  /?token=T             sets the token cookie and redirects to the page without T
  POST /auth                 {"token": T} (JSON or form): sets the token cookie, or 401
Every search takes k, nprobe and the filters label, min_count, min_score, min_width,
min_height, since, until, run_id, region, min_area (see pipelines.serve.facets).

Bad input is a 4xx with {"error": "<one line>"}; an unexpected failure is a 500 with no
traceback in the answer (it goes to the log). Clients never make the service fetch a URL:
images come as uploads or as ids of the index, and /images serves only what the index lists.

The vector search (`POST /search/vector`, what programs call) takes a fast lane: the
app's ASGI entry point answers it directly behind the same Guard (token, body limits),
with the same validation, errors and JSON, without Starlette's router, FastAPI's
middleware layers and dependency solving (they cost more Python per request than the
search itself). Its FastAPI route stays, for the OpenAPI schema, and runs the same code.

With a token set, requests carry it as `Authorization: Bearer T` or in the `lakelens_token`
cookie, which only the server sets (HttpOnly, SameSite=Strict, Path=/; Secure when the
request came over TLS, as uvicorn's proxy headers from a trusted, by default loopback,
proxy say, or --public-url is https): the page's script never holds the token.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, unquote, urlencode

import numpy as np
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import LakelensError
from pipelines.dedup import DEFAULT_THRESHOLD
from pipelines.serve.duplicates import DuplicateGroups, NoDedupTable
from pipelines.serve.engine import Engine, PixelBudgetError, ServeConfig, Snapshot, search_threads
from pipelines.serve.facets import Filter

logger = logging.getLogger(__name__)

TOKEN_ENV = "LAKELENS_SERVE_TOKEN"
CONFIG_ENV = "LAKELENS_SERVE_CONFIG"  # the config, as JSON, for uvicorn's worker processes
TOKEN_COOKIE = "lakelens_token"
OPEN_PATHS = {"/", "/health", "/auth"}  # the page asks for the token itself; probes need no secret
PAGE = Path(__file__).with_name("page.html")
IMAGE_SIZES = (64, 2048)
BROWSE_LIMIT = 500  # images per /browse page


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class VectorQuery(BaseModel):
    vector: list[float] | None = None
    vectors: list[list[float]] | None = None
    k: int = 10
    nprobe: int | None = None
    label: str | None = None
    min_count: int = 1
    min_score: float = 0.5
    min_width: int | None = None
    min_height: int | None = None
    since: str | None = None
    until: str | None = None
    run_id: str | None = None
    region: str | None = None
    min_area: float = 0.0


def _when(value: str | None, name: str) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError as e:
        raise ApiError(400, f"{name}={value!r} is not an ISO date or time (e.g. 2026-11-29 or "
                            "2026-11-29T02:00:00Z)") from e
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def make_filter(label: str | None = None, min_count: int = 1, min_score: float = 0.5,
                min_width: int | None = None, min_height: int | None = None,
                since: str | None = None, until: str | None = None,
                run_id: str | None = None, region: str | None = None,
                min_area: float = 0.0) -> Filter:
    if min_count < 1:
        raise ApiError(400, f"min_count must be >= 1, got {min_count}")
    if not 0.0 <= min_score <= 1.0:
        raise ApiError(400, f"min_score must be in [0, 1], got {min_score}")
    if not 0.0 <= min_area <= 1.0:
        raise ApiError(400, f"min_area must be in [0, 1] (a fraction of the image), got {min_area}")
    return Filter(label=label or None, min_count=min_count, min_score=min_score,
                  min_width=min_width, min_height=min_height, since=_when(since, "since"),
                  until=_when(until, "until"), run_id=run_id or None, region=region or None,
                  min_area=min_area)


def filter_params(label: Annotated[str | None, Query(description="a label the models saw")] = None,
                  min_count: Annotated[int, Query(description="at least this many of `label`")] = 1,
                  min_score: Annotated[float, Query(description="count detections scoring >= this")] = 0.5,
                  min_width: int | None = None, min_height: int | None = None,
                  since: Annotated[str | None, Query(description="annotated at or after (ISO)")] = None,
                  until: Annotated[str | None, Query(description="annotated before (ISO)")] = None,
                  run_id: str | None = None,
                  region: Annotated[str | None, Query(description="a semantic class in the image")] = None,
                  min_area: Annotated[float, Query(description="`region` covers >= this fraction")] = 0.0,
                  ) -> Filter:
    return make_filter(label, min_count, min_score, min_width, min_height, since, until, run_id,
                       region, min_area)


FilterParams = Annotated[Filter, Depends(filter_params)]

JSON_TYPE = (b"content-type", b"application/json")


class LakelensAPI(FastAPI):
    """FastAPI whose ASGI entry point first looks up `lanes` ((method, path) -> an ASGI
    app): a request that has one is answered by it, every other one by FastAPI."""

    lanes: dict[tuple[str, str], Any]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            lane = self.lanes.get((scope["method"], scope["path"]))
            if lane is not None:
                return await lane(scope, receive, send)
        await super().__call__(scope, receive, send)


def create_app(cfg: ServeConfig, *, token: str | None = None, engine: Engine | None = None) -> FastAPI:
    """The ASGI app. The engine (index, facets, embedder) opens at start-up, or is given.
    `POST /search/vector` goes through a fast lane (see the module doc)."""
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if getattr(app.state, "engine", None) is None:
            app.state.engine = Engine(cfg)
        # FAISS on the cores the event loop leaves (unless queries are heavy: HEAVY_QUERY_S)
        app.state.engine.batcher.threads = search_threads(cfg.workers)
        app.state.engine.start_watching()
        yield
        app.state.engine.stop()

    app = LakelensAPI(title="lakelens", summary="similarity search over an annotated image lake",
                      lifespan=lifespan)
    app.state.engine = engine
    limit = int(cfg.max_body_mb * 2**20)

    app.add_middleware(Guard, token=token, limit=limit)
    for kind in (ApiError, LakelensError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, _handle)

    def engine_of(request: Request) -> Engine:
        return request.app.state.engine

    def check_k(k: int, nprobe: int | None) -> None:
        if not 1 <= k <= cfg.max_k:
            raise ApiError(400, f"k must be in 1..{cfg.max_k}, got {k}")
        if nprobe is not None and nprobe < 1:
            raise ApiError(400, f"nprobe must be >= 1, got {nprobe}")

    async def answer(engine: Engine, snap: Snapshot, vectors: np.ndarray, k: int,
                     nprobe: int | None, flt: Filter, started: float,
                     queries: list[str] | None = None) -> bytes:
        """The JSON answer (see the README) for these query vectors."""
        # the filter runs here, in a worker thread: never in the event loop or the search thread
        rows = None if flt.is_empty() else await run_in_threadpool(snap.select, flt)
        found, allowed = await engine.batcher.submit_async(snap, vectors, k, flt, nprobe, rows=rows)
        facets = snap.facets
        results = []
        for rows, scores, ids, uris in zip(found.rows, found.scores, found.image_ids, found.uris,
                                           strict=True):
            # whole arrays to Python at once: a numpy scalar per hit costs more than the hit
            scores = [round(s, 6) for s in scores.tolist()]
            hits = [{"rank": n, "score": s, "image_id": i, "uri": u}
                    for n, s, i, u in zip(range(1, len(scores) + 1), scores, ids, uris, strict=True)]
            if facets is not None and len(rows):
                sized = facets.present[rows]
                for hit, ok, w, h in zip(hits, sized.tolist(), facets.width[rows].tolist(),
                                         facets.height[rows].tolist(), strict=True):
                    if ok:
                        hit["width"], hit["height"] = w, h
            results.append(hits)
        body = {"index_version": snap.version, "table_version": snap.table_version, "k": k,
                "metric": snap.index.manifest.get("metric"), "allowed": allowed,
                "took_ms": round((time.perf_counter() - started) * 1000, 3), "results": results}
        if queries is not None:
            body["queries"] = queries
        # plain json.dumps: FastAPI's generic encoder costs more than the search itself
        return json.dumps(body).encode()

    async def vector_search(engine: Engine, body: bytes, started: float) -> bytes:
        """`POST /search/vector` from its body to its answer (both lanes run this)."""
        # one pass of pydantic-core over the bytes: cheaper than FastAPI's parse-then-validate
        try:
            q = VectorQuery.model_validate_json(body)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        check_k(q.k, q.nprobe)
        flt = make_filter(q.label, q.min_count, q.min_score, q.min_width, q.min_height, q.since,
                          q.until, q.run_id, q.region, q.min_area)
        if (q.vector is None) == (q.vectors is None):
            raise ApiError(400, "give exactly one of 'vector' (one query) or 'vectors' (a list)")
        rows = [q.vector] if q.vector is not None else q.vectors
        if not rows or len({len(v) for v in rows}) != 1:
            raise ApiError(400, "'vectors' must be a non-empty list of equally long lists")
        vectors = np.asarray(rows, dtype=np.float32)
        if len(vectors) > cfg.max_k:
            raise ApiError(400, f"at most {cfg.max_k} vectors per request, got {len(vectors)}")
        snap = engine.current()
        if vectors.shape[1] != snap.index.dim:
            raise ApiError(400, f"vectors have dim {vectors.shape[1]}; the index holds dim "
                                f"{snap.index.dim}")
        return await answer(engine, snap, vectors, q.k, q.nprobe, flt, started)

    async def vector_lane(scope, receive, send) -> None:
        """`POST /search/vector` in plain ASGI (behind Guard): the route below, less
        FastAPI's layers; the same errors as its exception handlers give."""
        started = time.perf_counter()
        try:
            data = await vector_search(app.state.engine, await _read_body(receive, limit), started)
        except _Disconnected:
            return
        except Exception as e:
            return await _error_of(e, scope["method"], scope["path"])(scope, receive, send)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [JSON_TYPE, (b"content-length", b"%d" % len(data))]})
        await send({"type": "http.response.body", "body": data})

    app.lanes = {("POST", "/search/vector"): Guard(vector_lane, token=token, limit=limit)}

    secure_site = (cfg.public_url or "").startswith("https://")

    def login(request: Request, given: str, response: Response) -> Response:
        """`response` with the token cookie when `given` is the token; else a 401, no cookie."""
        if not token:
            raise ApiError(400, "this service runs without a token")
        if not token_matches(given, token):
            raise ApiError(401, "wrong token: use the one in --token-file or LAKELENS_SERVE_TOKEN, "
                                "or the URL `lakelens serve` printed")
        secure = secure_site or request.url.scheme == "https"
        response.headers.append("set-cookie", f"{TOKEN_COOKIE}={quote(token, safe='')}; HttpOnly; "
                                              f"SameSite=Strict; Path=/{'; Secure' if secure else ''}")
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> Response:
        given = request.query_params.get("token")
        if token and given is not None:  # the printed URL: the token moves into the cookie
            rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            return login(request, given, Response(status_code=303, headers={
                "Location": request.url.path + (f"?{rest}" if rest else "")}))
        return HTMLResponse(PAGE.read_text(), headers={"Cache-Control": "no-store"})

    @app.post("/auth", include_in_schema=False)
    async def auth(request: Request) -> Response:
        """Body {"token": T} (JSON) or a form field `token`: sets the cookie, or answers 401."""
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = json.loads(await request.body())
            except ValueError:
                body = None
        else:
            body = dict(await request.form())
        given = body.get("token") if isinstance(body, dict) else None
        if not isinstance(given, str) or not given:
            raise ApiError(400, "send the token as JSON {\"token\": ...} or as a form field 'token'")
        return login(request, given, JSONResponse({"authenticated": True}))

    @app.get("/health")
    def health(request: Request) -> dict:
        snap = engine_of(request).current()
        return {"status": "ok", "index_version": snap.version, "table_version": snap.table_version,
                "images": snap.index.live_count()}

    @app.get("/stats")
    def stats(request: Request) -> dict:
        engine = engine_of(request)
        snap = engine.current()
        m = snap.index.manifest
        return {"index_version": snap.version, "factory": m.get("factory"), "dim": m.get("dim"),
                "metric": m.get("metric"), "images": snap.index.live_count(),
                "vectors": snap.index.index.ntotal, "recall_at_10": m.get("recall_at_10"),
                "search_params": m.get("search_params"), "embedder": m.get("embedder"),
                "built_at": m.get("built_at"), "index_table_version": m.get("table_version"),
                "table_version": snap.table_version, "memory_mapped": snap.index.mmapped,
                "filters": snap.facets is not None, "reloads": engine.reloads,
                "facets": snap.facets.info() if snap.facets is not None else None,
                "reload_errors": engine.reload_errors, "search_calls": engine.batcher.calls,
                "searched_queries": engine.batcher.queries,
                "loaded_at": datetime.fromtimestamp(snap.loaded_at, UTC).isoformat(),
                "max_k": cfg.max_k}

    @app.get("/labels")
    def labels(request: Request, min_score: float = 0.5) -> dict:
        snap = engine_of(request).current()
        if snap.facets is None:
            return {"source": None, "labels": {}, "regions": {}}
        return {"source": snap.facets.source, "min_score": min_score,
                "labels": snap.facets.label_counts(min_score),
                "regions": snap.facets.region_counts()}

    @app.get("/browse")
    def browse(request: Request, flt: FilterParams, offset: int = 0, limit: int = 48) -> Response:
        if not 1 <= limit <= BROWSE_LIMIT:
            raise ApiError(400, f"limit must be in 1..{BROWSE_LIMIT}, got {limit}")
        if offset < 0:
            raise ApiError(400, f"offset must be >= 0, got {offset}")
        total, ids, uris = engine_of(request).current().browse(flt, offset, limit)
        images = [{"image_id": i, "uri": u} for i, u in zip(ids, uris, strict=True)]
        return Response(json.dumps({"total": total, "offset": offset, "images": images}),
                        media_type="application/json")

    @app.get("/search")
    async def search_id(request: Request, image_id: str, flt: FilterParams, k: int = 10,
                  nprobe: int | None = None) -> Response:
        started = time.perf_counter()
        check_k(k, nprobe)
        snap = engine_of(request).current()
        if snap.index.row(image_id) is None:
            raise ApiError(404, f"image_id {image_id!r} is not in the index")
        return _json(await answer(engine_of(request), snap, snap.index.vectors_of([image_id]), k, nprobe,
                                  flt, started, [image_id]))

    vector_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": VectorQuery.model_json_schema()}}}}

    @app.post("/search/vector", openapi_extra=vector_body)
    async def search_vector(request: Request) -> Response:
        """Answered by the fast lane (app.lanes) when the app is called as a whole; the
        same code here."""
        started = time.perf_counter()
        return _json(await vector_search(engine_of(request), await request.body(), started))

    @app.post("/search/image")
    async def search_image(request: Request, image: Annotated[list[UploadFile], File()],
                     flt: FilterParams, k: int = 10, nprobe: int | None = None) -> Response:
        started = time.perf_counter()
        check_k(k, nprobe)
        if len(image) > cfg.max_images:
            raise ApiError(400, f"at most {cfg.max_images} images per request, got {len(image)}")
        engine = engine_of(request)
        snap = engine.current()
        data = [await f.read() for f in image]
        # decoding and the embedder run in a worker thread; the event loop stays free
        try:  # the pixel budget is checked from the headers before anything is decoded
            vectors = await run_in_threadpool(engine.embed, snap, data)
        except PixelBudgetError as e:
            raise ApiError(413, str(e)) from e
        return _json(await answer(engine, snap, vectors, k, nprobe, flt, started,
                                  [f.filename or "" for f in image]))

    @app.get("/images/{image_id}")
    def image(request: Request, image_id: str, size: int = 512, overlay: bool = False) -> Response:
        from PIL import Image

        from models.decode import DEFAULT_MAX_IMAGE_MB, decode_image, max_image_bytes
        from pipelines.lake.sources import read_bytes

        if not IMAGE_SIZES[0] <= size <= IMAGE_SIZES[1]:
            raise ApiError(400, f"size must be in {IMAGE_SIZES[0]}..{IMAGE_SIZES[1]}, got {size}")
        snap = engine_of(request).current()
        row = snap.index.row(image_id)
        if row is None:
            raise ApiError(404, f"image_id {image_id!r} is not in the index")
        uri = snap.index.uri(row)
        try:
            data = read_bytes(uri, max_bytes=max_image_bytes(DEFAULT_MAX_IMAGE_MB))  # annotate's cap
            pixels = decode_image(data, max_pixels=cfg.max_pixels, long=size).pixels
        except (OSError, ValueError) as e:
            raise ApiError(404, f"image {image_id!r} cannot be read any more: {type(e).__name__}") from e
        picture = Image.fromarray(pixels)
        if overlay:
            picture = _overlay(snap, image_id, pixels) or picture
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300"})

    dup_groups = DuplicateGroups(recheck_s=cfg.reload_s)

    @app.get("/images/{image_id}/duplicates")
    def duplicates(request: Request, image_id: str, threshold: float | None = None) -> dict:
        """{"image_id", "group_id" (null: in no group), "threshold", "duplicates": [{"image_id",
        "uri", "similarity"}]}: the other images of its near-duplicate group, most similar first."""
        snap = engine_of(request).current()
        try:
            groups = dup_groups.groups(snap, DEFAULT_THRESHOLD if threshold is None else threshold)
        except NoDedupTable as e:
            raise ApiError(404, str(e)) from e
        if snap.index.row(image_id) is None:
            raise ApiError(404, f"image_id {image_id!r} is not in the index")
        return {"image_id": image_id, "group_id": groups.group_of(image_id),
                "threshold": groups.threshold, "duplicates": groups.duplicates(image_id)}

    return app


class Guard:
    """Pure ASGI middleware (no per-request task, unlike `@app.middleware`): the token when
    one is set, and the request body limit (a POST must say its Content-Length, which the
    server then holds the body to)."""

    def __init__(self, app, *, token: str | None, limit: int):
        self.app, self.token, self.limit = app, token, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ").strip()
            if not given:
                given = _cookie(headers.get(b"cookie", b"").decode("latin-1"), TOKEN_COOKIE)
            if not token_matches(given, self.token):
                return await _error(401, "missing or wrong token: send 'Authorization: Bearer "
                                         "<token>'")(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _error(413, f"request body of {int(length)} bytes exceeds the limit of "
                                     f"{self.limit} bytes (--max-body-mb)")(scope, receive, send)
        if scope["method"] in ("POST", "PUT") and length is None:
            return await _error(411, "send a Content-Length header (chunked uploads are not "
                                     "accepted)")(scope, receive, send)
        await self.app(scope, receive, send)


def token_matches(given: str, token: str) -> bool:
    """Whether `given` is the token, compared in constant time."""
    return hmac.compare_digest(given.encode(), token.encode())


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return unquote(value)
    return ""


def _overlay(snap: Snapshot, image_id: str, pixels: np.ndarray):
    """The image with its row's detections, masks and poses drawn, from the table version
    the snapshot's facets were read at; None when that version has no current row for it."""
    from pipelines.render import render_row

    if snap.facets is None:
        return None
    table = snap.facets.table
    found = table.lookup(image_id, ["width", "height", "detections", "instances", "poses"])
    if found is None:
        return None
    row = {"detections": None, "instances": None, "poses": None, **found}
    return render_row(row, pixels)


class _Disconnected(Exception):
    """The client went away before its request body arrived."""


async def _read_body(receive, limit: int) -> bytes:
    """The request body, at most `limit` bytes (413 beyond: Guard checked the announced
    Content-Length, this the bytes that came)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _json(data: bytes) -> Response:
    return Response(data, media_type="application/json")


def _error_of(e: Exception, method: str, path: str) -> JSONResponse:
    """The answer to an exception a request raised: a 4xx with one line for bad input, a
    500 naming only the exception class for anything else (its traceback goes to the log)."""
    if isinstance(e, ApiError):
        return _error(e.status, str(e))
    if isinstance(e, LakelensError):
        return _error(400, str(e))
    if isinstance(e, RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return _error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")
    if isinstance(e, StarletteHTTPException):
        return _error(e.status_code, str(e.detail))
    logger.error("%s %s failed", method, path, exc_info=e)
    return _error(500, f"internal error ({type(e).__name__}); see the server log")


async def _handle(request: Request, e: Exception) -> JSONResponse:
    """FastAPI's exception handler for every kind (see _error_of)."""
    return _error_of(e, request.method, request.url.path)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0] if message else "error"}, status_code=status)


def app_from_env() -> FastAPI:
    """uvicorn's factory in each worker process (`--workers N`)."""
    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))
