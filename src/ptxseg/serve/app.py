"""The HTTP API of ``ptxseg serve`` (FastAPI on uvicorn): routes, the request's way through
the :class:`~ptxseg.serve.service.Service`, and how each failure is answered.

Routes: ``POST /v1/predict``, ``GET /v1/model``, ``GET /healthz``, ``GET /`` (the viewer),
``GET /docs`` (the API reference) and ``GET /openapi.json``.

Answers to failures (JSON ``{"detail": "<one line>"}``; the service keeps serving):

=====  =====================================================================================
400    not an image, truncated or corrupt; a multipart body without a file; a bad
       ``Content-Length``
413    a body over ``--max-body-mb`` (checked against ``Content-Length`` first, then counted
       while reading: a large body is never held whole); an image whose header claims more
       pixels than the limit (``PTXSEG_MAX_PIXELS``), refused before decoding
415    ``format=dicom-seg`` for an upload that is not a DICOM
422    an image that reads but cannot be used (a DICOM without pixel data, of a SOP class that
       is not a radiograph's, or whose compression no installed handler decodes; a DICOM SEG
       that cannot be made of it); a query parameter out of its choices
500    anything unexpected (one line; the service goes on)
503    the service holds ``--queue`` requests already: retry after ``Retry-After`` seconds
=====  =====================================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from ptxseg.data.imageio import TooManyPixels, UnsupportedImage
from ptxseg.errors import PtxsegError, one_line
from ptxseg.serve.page import docs_page, viewer_page
from ptxseg.serve.service import (
    MAP_MAX_SIDE,
    PREVIEW_MAX_SIDE,
    RETRY_AFTER_S,
    Busy,
    NotDicom,
    Service,
)
from ptxseg.serve.upload import FILE_FIELD, BadUpload, BodyTooLarge, image_of, read_body

log = logging.getLogger("ptxseg.serve")

DESCRIPTION = """Pneumothorax segmentation of chest radiographs by one ptxseg run, loaded once.
Research use only: not for diagnosis.

Send an image (PNG, JPEG or DICOM) to `POST /v1/predict`, as the raw request body or as the
field `file` of a `multipart/form-data` body. Images are analysed in memory; nothing is
written on the server, and no request names a file on it.

Masks are those of `ptxseg predict` with the same run: the model's probabilities brought back
to the image's size and thresholded by the run's rule (`GET /v1/model`). Images come back as
base64 PNG inside the JSON answer (nothing to fetch later)."""


class ProbabilityMap(BaseModel):
    """The probability map at a reduced size, for a threshold slider."""

    width: int
    height: int
    png: str = Field(description="base64 8-bit gray PNG: probability = value / 255")


class Prediction(BaseModel):
    """The answer of `POST /v1/predict` (format=json)."""

    format: str = Field(description="the format read: DICOM, PNG, JPEG ...")
    width: int = Field(description="the image's width (px)")
    height: int = Field(description="the image's height (px)")
    has_pneumothorax: bool = Field(description="the mask is not empty")
    max_prob: float = Field(description="highest probability, at model resolution (as "
                                        "predict's results.csv)")  # fmt: skip
    area_px: int = Field(description="mask pixels at the image's size")
    area_fraction: float = Field(description="area_px / (width x height)")
    area_cm2: float | None = Field(description="area in cm2 from the DICOM pixel spacing; "
                                               "null where unknown (see area_note)")  # fmt: skip
    area_note: str = Field(description="where the spacing came from, or why there is none")
    side: str = Field(description="none, right, left, both or n/a (patient's side)")
    right_share: float | None = Field(description="share of the area on the patient's right")
    side_basis: str = Field(description="which header tag gave the orientation")
    rle: str = Field(description="the mask as SIIM-ACR run-length (column-major, relative "
                                 "starts; -1 when empty)")  # fmt: skip
    thresholds: dict[str, Any] = Field(description="the post-processing rule used")
    seconds: float = Field(description="time in the service")
    mask_png: str | None = Field(None, description="base64 PNG of the mask (0/255, the image's "
                                                   "size); absent with images=false")  # fmt: skip
    overlay_png: str | None = Field(None, description="base64 PNG of the overlay (longest side "
                                                      "<= 1024 px, with a caption)")  # fmt: skip
    probability_map: ProbabilityMap | None = Field(
        None, description=f"probabilities at <= {MAP_MAX_SIDE} px (longest side)"
    )
    preview_png: str | None = Field(
        None, description=f"base64 gray PNG of the radiograph at <= {PREVIEW_MAX_SIDE} px"
    )


ERRORS = {
    400: "not an image, truncated or corrupt; a multipart body without a file",
    413: "request body over the limit (--max-body-mb), or an image over the pixel limit",
    415: "format=dicom-seg for an upload that is not a DICOM",
    422: "an image that reads but cannot be used (e.g. a DICOM without pixel data, a DICOM SEG "
    "or SR, a compression no installed handler decodes); a bad query parameter",
    503: "busy: the queue is full; retry after Retry-After seconds",
}
BODY_DOC = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                "required": [FILE_FIELD],
            }
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    },
}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": one_line(message)}, status_code=status, headers=headers)


def create_app(service: Service) -> FastAPI:
    """The app of a loaded :class:`Service`; its lifespan starts and closes the service."""
    from ptxseg import __version__

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="ptxseg",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # FastAPI's Swagger UI loads its script from a CDN: ours is /docs
        redoc_url=None,
    )
    app.state.service = service
    model = service.model_info()
    viewer, viewer_csp = viewer_page(model)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        return _error(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        return _error(413, str(exc), {"Connection": "close"})

    @app.exception_handler(BadUpload)
    async def _bad_upload(request: Request, exc: BadUpload):
        return _error(400, str(exc))

    @app.exception_handler(NotDicom)
    async def _not_dicom(request: Request, exc: NotDicom):
        return _error(415, str(exc))

    @app.exception_handler(PtxsegError)
    async def _bad_image(request: Request, exc: PtxsegError):
        status = 400
        if isinstance(exc, UnsupportedImage):
            status = 413 if isinstance(exc, TooManyPixels) else 422
        return _error(status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _bad_query(request: Request, exc: RequestValidationError):
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in exc.errors()
        ]
        return _error(422, "; ".join(problems) or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}: {exc})")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(viewer, headers={"Content-Security-Policy": viewer_csp})

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        text, policy = docs_page(app.openapi())
        return HTMLResponse(text, headers={"Content-Security-Policy": policy})

    @app.get("/healthz", summary="Liveness and load")
    async def healthz() -> dict[str, Any]:
        """`status` ok while the service answers; requests in it, the queue bound, the batch
        sizes run so far."""
        return service.health()

    @app.get("/v1/model", summary="The model served")
    async def model_info() -> dict[str, Any]:
        """The run (folder name), architecture, encoder, input size, thresholds rule and its
        source, test-time augmentation, backend, device, ptxseg version and the service's
        limits."""
        return model

    @app.post(
        "/v1/predict",
        summary="Segment one radiograph",
        response_model=Prediction,
        responses={
            200: {"content": {"application/dicom": {}},
                  "description": "JSON (format=json) or a DICOM SEG (format=dicom-seg)"},
            **{code: {"description": text} for code, text in ERRORS.items()},
        },  # fmt: skip
        openapi_extra={"requestBody": BODY_DOC},
    )
    async def predict(
        request: Request,
        format: Literal["json", "dicom-seg"] = Query(
            "json", description="json: the answer below; dicom-seg: a DICOM SEG of the mask "
            "(DICOM uploads only)",
        ),
        images: bool = Query(
            True, description="include the PNGs (mask, overlay, probability map, preview)"
        ),
    ):
        """The mask, finding and measures of one image (PNG, JPEG or DICOM; raw body or the
        multipart field `file`)."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        with service.admitted():
            body = await read_body(request, service.max_body)
            data, name = image_of(body, request.headers.get("content-type", ""))
            del body
            upload = await loop.run_in_executor(service.pool, service.decode, data, name)
            del data
            if format == "dicom-seg" and upload.dataset is None:
                raise NotDicom(
                    f"format=dicom-seg needs a DICOM upload (got a {upload.format} image)"
                )
            probs = await service.infer(upload)
            if format == "dicom-seg":
                seg = await loop.run_in_executor(service.pool, service.dicom_seg, upload, probs)
                return Response(
                    seg, media_type="application/dicom",
                    headers={"Content-Disposition": 'attachment; filename="seg.dcm"'},
                )  # fmt: skip
            work = functools.partial(service.result, upload, probs, images=images)
            out = await loop.run_in_executor(service.pool, work)
        out["seconds"] = round(time.perf_counter() - t0, 4)
        return JSONResponse(out)

    return app
