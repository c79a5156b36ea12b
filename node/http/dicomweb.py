"""DICOMweb routes (PS3.18): QIDO-RS, WADO-RS and STOW-RS, mounted at ``/dicom-web``.

Every route reads the same index and store as DIMSE: searches go through ``storage.query`` (the
C-FIND matching), retrieves through ``storage.query.locate`` (the C-MOVE selection) and the
stored files, stores through the C-STORE service. Blocking work (SQL, files, codecs) runs in
Starlette's thread pool; instance bodies are streamed from the files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from pacsnode.node import metrics
from pacsnode.node.http import qido, stow, wado
from pacsnode.node.http.auth import User, require
from pacsnode.node.http.context import HttpContext
from pacsnode.node.http.settings import Role
from pacsnode.storage import StorageError
from pacsnode.storage.db import read_connection
from pacsnode.storage.query import InstanceLocation, Level, Model, QueryError, find_page, parse_retrieve

_Accepted = TypeVar("_Accepted")

__all__ = ["DICOM_JSON", "routes"]

logger = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
_MAX_RETRIEVE = 1_000_000


def _ctx(request: Request) -> HttpContext:
    ctx: HttpContext = request.app.state.ctx
    return ctx


def _root(request: Request) -> str:
    """The DICOMweb root URL (for RetrieveURL and BulkDataURI): ``http.public_url``, else as the client reached it."""
    public = _ctx(request).settings.http.public_url
    return (public or str(request.base_url)).rstrip("/") + "/dicom-web"


def _error(code: int, message: str) -> Response:
    return PlainTextResponse(message.rstrip("\n") + "\n", status_code=code)


def _json(document: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(document, status_code=status_code, media_type=DICOM_JSON, headers=headers)


def _accepts_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return True
    return any(
        media.split(";", 1)[0].strip().lower()
        in ("*/*", "application/*", "application/json", DICOM_JSON, "multipart/related")
        for media in accept.split(",")
    )


def _user(request: Request) -> User:
    user: User = request.state.user
    return user


# -- QIDO-RS -----------------------------------------------------------------------------------


def _search(level: Level, scope: Level) -> Callable[[Request], Any]:
    @require(Role.VIEWER)
    async def search(request: Request) -> Response:
        ctx = _ctx(request)
        if not _accepts_json(request):
            return _error(406, "search results are application/dicom+json")
        started = time.perf_counter()
        try:
            parsed = qido.parse_qido(
                list(request.query_params.multi_items()),
                level=level,
                scope=scope,
                study_uid=request.path_params.get("study"),
                series_uid=request.path_params.get("series"),
                case_insensitive_names=ctx.settings.query.case_insensitive_names,
            )
        except qido.QidoError as exc:
            _log_refused(request, 400, str(exc))
            return _error(400, str(exc))
        cap = ctx.settings.query.max_matches
        count = min(parsed.limit, cap) if parsed.limit is not None else cap

        def run() -> tuple[list[dict[str, Any]], bool]:
            with read_connection(ctx.engine) as conn:
                return find_page(conn, parsed.query, offset=parsed.offset, count=count)

        try:
            rows, more = await run_in_threadpool(run)
        except StorageError as exc:
            logger.error("QIDO-RS %s failed: %s", request.url.path, exc)
            return _error(503, f"index unavailable: {exc}")
        root = _root(request)
        answers = [qido.answer_json(parsed, row, root=root) for row in rows]
        metrics.query_answered("QIDO-RS", level.value, time.perf_counter() - started)
        warnings = []
        if more:
            warnings.append('299 pacsnode "There are additional results that can be requested"')
        if parsed.fuzzy_ignored:
            warnings.append('299 pacsnode "fuzzymatching is not supported: only literal matching was performed"')
        if parsed.query.unsupported:
            warnings.append(f'299 pacsnode "not matched: {", ".join(parsed.query.unsupported)}"')
        logger.info(
            "QIDO-RS %s by %r: %s level, %d match(es)%s, %.1f ms",
            request.url.path,
            _user(request).name,
            level.value,
            len(answers),
            " (more follow)" if more else "",
            (time.perf_counter() - started) * 1000,
            extra={"action": "qido-rs", "level": level.value, "matches": len(answers)},
        )
        headers = {"Warning": ", ".join(warnings)} if warnings else None
        return _json(answers, headers=headers)

    return search


def _log_refused(request: Request, code: int, reason: str) -> None:
    user = getattr(request.state, "user", None)
    logger.warning(
        "DICOMweb %s %s by %r refused with %d: %s",
        request.method,
        request.url.path,
        user.name if user else None,
        code,
        reason,
        extra={"action": "dicomweb-refused", "status": code, "path": request.url.path},
    )


# -- WADO-RS -----------------------------------------------------------------------------------


def _identifier(request: Request) -> tuple[Dataset, Level]:
    params = request.path_params
    ds = Dataset()
    ds.StudyInstanceUID = params["study"]
    level = Level.STUDY
    if "series" in params:
        ds.SeriesInstanceUID = params["series"]
        level = Level.SERIES
    if "instance" in params:
        ds.SOPInstanceUID = params["instance"]
        level = Level.IMAGE
    ds.QueryRetrieveLevel = level.value
    return ds, level


async def _located(request: Request) -> list[InstanceLocation] | Response:
    ctx = _ctx(request)
    identifier, _level = _identifier(request)
    try:
        parsed = parse_retrieve(identifier, Model.STUDY_ROOT)
        located = await run_in_threadpool(ctx.archive.locate, parsed, limit=_MAX_RETRIEVE)
    except QueryError as exc:
        _log_refused(request, 400, str(exc))
        return _error(400, str(exc))
    except StorageError as exc:
        logger.error("WADO-RS %s failed: %s", request.url.path, exc)
        return _error(503, f"index unavailable: {exc}")
    if not located:
        return _error(404, "no such instances")
    return located


def _not_acceptable(request: Request, exc: wado.NotAcceptableError) -> Response:
    _log_refused(request, 406, str(exc))
    return _error(406, str(exc))


async def _negotiated(
    request: Request, negotiate: Callable[[str], _Accepted]
) -> tuple[_Accepted, list[InstanceLocation]] | Response:
    """What the Accept header asks for (``negotiate``), then the instances the path names; or the error response."""
    try:
        accepted = negotiate(request.headers.get("accept", ""))
    except wado.NotAcceptableError as exc:
        return _not_acceptable(request, exc)
    located = await _located(request)
    if isinstance(located, Response):
        return located
    return accepted, located


def _path(ctx: HttpContext, location: InstanceLocation) -> Path:
    return ctx.archive.instance_path(location.file_path)


@require(Role.VIEWER)
async def retrieve(request: Request) -> Response:
    """Study, series or instance as multipart/related; type="application/dicom"."""
    ctx = _ctx(request)
    found = await _negotiated(request, wado.negotiate_dicom)
    if isinstance(found, Response):
        return found
    accepted, located = found
    try:
        wado.check_transcodable({loc.transfer_syntax_uid for loc in located}, accepted)
    except wado.NotAcceptableError as exc:
        return _not_acceptable(request, exc)
    files = await run_in_threadpool(lambda: [(_path(ctx, loc), loc.transfer_syntax_uid) for loc in located])
    boundary = wado.new_boundary()
    logger.info(
        "WADO-RS %s by %r: %d instance(s)",
        request.url.path,
        _user(request).name,
        len(files),
        extra={"action": "wado-rs", "instances": len(files)},
    )
    body = wado.multipart_stream(wado.dicom_parts(files, accepted), boundary)
    media = f'multipart/related; type="application/dicom"; boundary={boundary}'
    headers = None
    if all(accepted.transfer_syntax_uid in (None, stored) for _path, stored in files):
        try:  # sent as stored: the length is known, so no chunked transfer coding
            length = await run_in_threadpool(wado.stored_length, files, boundary)
            headers = {"Content-Length": str(length)}
        except OSError:
            headers = None  # a file gone: the stream reports it
    return StreamingResponse(body, media_type=media, headers=headers)


@require(Role.VIEWER)
async def metadata(request: Request) -> Response:
    ctx = _ctx(request)
    if not _accepts_json(request):
        return _error(406, "metadata is application/dicom+json")
    located = await _located(request)
    if isinstance(located, Response):
        return located
    root = _root(request)
    documents = await run_in_threadpool(lambda: [wado.metadata_json(_path(ctx, loc), root) for loc in located])
    return _json(documents)


@require(Role.VIEWER)
async def bulkdata(request: Request) -> Response:
    ctx = _ctx(request)
    located = await _located(request)
    if isinstance(located, Response):
        return located
    try:
        tag = int(request.path_params["tag"], 16)
    except ValueError:
        return _error(400, "the bulk data path ends in a tag (8 hex digits)")
    value = await run_in_threadpool(wado.bulkdata, _path(ctx, located[0]), tag)
    if value is None:
        return _error(404, "no bulk data at that tag")
    boundary = wado.new_boundary()
    body = b"".join(wado.multipart_stream([("application/octet-stream", (value,))], boundary))
    return Response(body, media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}')


@require(Role.VIEWER)
async def frames(request: Request) -> Response:
    ctx = _ctx(request)
    try:
        numbers = wado.parse_frame_list(request.path_params["frames"])
    except ValueError as exc:
        return _error(400, str(exc))
    located = await _located(request)
    if isinstance(located, Response):
        return located
    loc = located[0]
    try:
        as_stored = wado.negotiate_frames(request.headers.get("accept", ""), loc.transfer_syntax_uid)
        parts = await run_in_threadpool(wado.frame_parts, _path(ctx, loc), numbers, as_stored)
    except wado.NotAcceptableError as exc:
        return _not_acceptable(request, exc)
    except LookupError as exc:
        return _error(404, str(exc))
    boundary = wado.new_boundary()
    body = b"".join(wado.multipart_stream(((ct, (data,)) for ct, data in parts), boundary))
    inner = "application/octet-stream"
    return Response(body, media_type=f'multipart/related; type="{inner}"; boundary={boundary}')


def _rendered(*, thumbnail: bool) -> Callable[[Request], Any]:
    @require(Role.VIEWER)
    async def rendered(request: Request) -> Response:
        ctx = _ctx(request)
        found = await _negotiated(request, wado.negotiate_image)
        if isinstance(found, Response):
            return found
        media, located = found
        loc = located[len(located) // 2]  # a series or study: its middle image
        frame = request.path_params.get("frame", "1")
        query = request.query_params
        try:
            image = await run_in_threadpool(
                lambda: wado.render(
                    _path(ctx, loc),
                    frame=int(frame),
                    media_type=media,
                    window=query.get("window"),
                    viewport=query.get("viewport"),
                    quality=query.get("quality"),
                    thumbnail=thumbnail,
                )
            )
        except ValueError as exc:
            return _error(400, str(exc))
        except LookupError as exc:
            return _error(404, str(exc))
        except Exception as exc:  # a codec missing or failing: the image cannot be rendered
            logger.warning("cannot render %s: %s", loc.sop_instance_uid, exc)
            return _error(406, f"cannot render this image: {type(exc).__name__}")
        return Response(image, media_type=media)

    return rendered


# -- STOW-RS -----------------------------------------------------------------------------------


@require(Role.UPLOADER)
async def store(request: Request) -> Response:
    ctx = _ctx(request)
    study_uid = request.path_params.get("study")
    started = time.perf_counter()
    try:
        boundary = stow.parse_content_type(request.headers.get("content-type", ""))
    except stow.StowError as exc:
        _log_refused(request, exc.http_status, str(exc))
        return _error(exc.http_status, str(exc))
    receiver = stow.StowParts(
        boundary=boundary, tmp_dir=ctx.archive.store.tmp_dir, max_bytes=ctx.settings.http.max_stow_bytes
    )
    try:
        async for chunk in request.stream():
            await run_in_threadpool(receiver.feed, chunk)
        receiver.finish()
    except stow.StowError as exc:
        receiver.discard()
        _log_refused(request, exc.http_status, str(exc))
        return _error(exc.http_status, str(exc))
    except BaseException:
        receiver.discard()
        raise
    if not receiver.parts:
        return _error(400, "the multipart body holds no part")
    user = _user(request)
    result, where = await run_in_threadpool(
        stow.store_parts, receiver.parts, service=ctx.store, calling=user.name[:16], study_uid=study_uid
    )
    root = _root(request)

    def instance_url(sop_instance_uid: str) -> str | None:
        study, series = where.get(sop_instance_uid, ("", ""))
        return f"{root}/studies/{study}/series/{series}/instances/{sop_instance_uid}" if study and series else None

    level = logging.INFO if not result.failed else logging.WARNING
    reasons = "; ".join(f"{uid[:64]}: 0x{code:04X} {comment}" for _c, uid, code, comment in result.failed[:5])
    logger.log(
        level,
        "STOW-RS by %r: %d stored, %d failed, %d byte(s), %.2f s%s",
        user.name,
        len(result.stored),
        len(result.failed),
        receiver.received,
        time.perf_counter() - started,
        f" ({reasons})" if reasons else "",
        extra={"action": "stow-rs", "stored": len(result.stored), "failed": len(result.failed)},
    )
    study_url = f"{root}/studies/{study_uid}" if study_uid else None
    return _json(result.response(study_url, instance_url), status_code=result.http_status)


def routes(ctx: HttpContext) -> list[BaseRoute]:
    """The DICOMweb routes, relative to the mount point."""
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    get = ["GET"]
    return [
        Route("/studies", _search(Level.STUDY, Level.PATIENT), methods=get),
        Route("/studies", store, methods=["POST"]),
        Route("/series", _search(Level.SERIES, Level.PATIENT), methods=get),
        Route("/instances", _search(Level.IMAGE, Level.PATIENT), methods=get),
        Route(study, retrieve, methods=get),
        Route(study, store, methods=["POST"]),
        Route(study + "/metadata", metadata, methods=get),
        Route(study + "/series", _search(Level.SERIES, Level.STUDY), methods=get),
        Route(study + "/instances", _search(Level.IMAGE, Level.STUDY), methods=get),
        Route(study + "/thumbnail", _rendered(thumbnail=True), methods=get),
        Route(series, retrieve, methods=get),
        Route(series + "/metadata", metadata, methods=get),
        Route(series + "/instances", _search(Level.IMAGE, Level.SERIES), methods=get),
        Route(series + "/thumbnail", _rendered(thumbnail=True), methods=get),
        Route(series + "/rendered", _rendered(thumbnail=False), methods=get),
        Route(instance, retrieve, methods=get),
        Route(instance + "/metadata", metadata, methods=get),
        Route(instance + "/rendered", _rendered(thumbnail=False), methods=get),
        Route(instance + "/thumbnail", _rendered(thumbnail=True), methods=get),
        Route(instance + "/frames/{frames}", frames, methods=get),
        Route(instance + "/frames/{frame:int}/rendered", _rendered(thumbnail=False), methods=get),
        Route(instance + "/frames/{frame:int}/thumbnail", _rendered(thumbnail=True), methods=get),
        Route(instance + "/bulkdata/{tag}", bulkdata, methods=get),
    ]
