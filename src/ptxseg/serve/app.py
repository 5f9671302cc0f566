"""The HTTP API of ``ptxseg serve`` (FastAPI on uvicorn): routes, the request's way through
the :class:`~ptxseg.serve.service.Service`, and how each failure is answered.

Routes: ``POST /v1/predict``, ``GET /v1/model``, ``GET /healthz``, ``GET /`` (the viewer),
``GET /docs`` (the API reference) and ``GET /openapi.json``. Around them, outermost first:
:class:`~ptxseg.serve.logs.RequestLog` (one access line per request; an unexpected error
answered 500), :class:`~ptxseg.serve.access.HostCheck` (the ``Host`` allow-list) and, with a
token, :class:`~ptxseg.serve.access.BearerAuth`.

Answers to failures (JSON ``{"detail": "<one line>"}``; the service keeps serving):

=====  =====================================================================================
400    not an image, truncated or corrupt; a multipart body without a file, malformed or over
       its limits (parts, header lines, boundary length); a bad ``Content-Length``; a
       ``Host`` header not allowed (plain text ``Invalid host header``, Starlette's)
401    no or a wrong bearer token (when the service has one), ``WWW-Authenticate: Bearer``
408    a body not complete within ``--body-timeout-s`` (the connection is closed)
413    a body over ``--max-body-mb`` (checked against ``Content-Length`` first, then counted
       while reading: a large body is never held whole); an image whose header claims more
       pixels than the limit (``PTXSEG_MAX_PIXELS``), refused before decoding
415    ``format=dicom-seg`` for an upload that is not a DICOM
422    an image that reads but cannot be used (a DICOM without pixel data, of a SOP class that
       is not a radiograph's, or whose compression no installed handler decodes; a DICOM SEG
       that cannot be made of it); a query parameter out of its choices
500    anything unexpected (one line; the service goes on)
503    ``--max-uploads`` bodies being received or ``--queue`` requests in the service already:
       retry after ``Retry-After`` seconds; or the model worker has stopped (no
       ``Retry-After``; ``/healthz`` answers 503 too)
=====  =====================================================================================

Every JSON answer is encoded by :func:`~ptxseg.serve.service.finite_json` first: a number
that is not finite is ``null``, its value named in ``not_finite`` (never a 500 for it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from ptxseg.data.imageio import TooManyPixels, UnsupportedImage
from ptxseg.errors import ModelOutputError, PtxsegError, one_line
from ptxseg.serve.access import Access, BearerAuth, HostCheck
from ptxseg.serve.logs import RequestLog, note
from ptxseg.serve.page import EXAMPLE_BASE, docs_page, viewer_page
from ptxseg.serve.service import (
    MAP_MAX_SIDE,
    PREVIEW_MAX_SIDE,
    RETRY_AFTER_S,
    Busy,
    NotDicom,
    Service,
    Unavailable,
    finite_json,
)
from ptxseg.serve.upload import (
    FILE_FIELD,
    BadUpload,
    BodyTimeout,
    BodyTooLarge,
    ClientGone,
    image_of,
)

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
    not_finite: dict[str, str] | None = Field(
        None, description="fields whose value was not a finite number (NaN, inf; e.g. an area "
        "from an absurd pixel spacing): they are null, their value is named here",
    )


ERRORS = {
    400: "not an image, truncated or corrupt; a multipart body without a file, malformed or "
    "over its limits; a Host header not allowed",
    401: "no or a wrong bearer token (the service was started with one)",
    408: "the body did not arrive whole within --body-timeout-s",
    413: "request body over the limit (--max-body-mb), or an image over the pixel limit",
    415: "format=dicom-seg for an upload that is not a DICOM",
    422: "an image that reads but cannot be used (e.g. a DICOM without pixel data, a DICOM SEG "
    "or SR, a compression no installed handler decodes); a bad query parameter",
    500: "the model gave a probability that is not finite (NaN or inf): a broken model",
    503: "busy: every upload or queue place is taken, retry after Retry-After seconds; or "
    "the model worker has stopped (no Retry-After)",
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


def code_samples(auth: bool) -> dict[str, dict[str, Any]]:
    """Each route's curl lines, as OpenAPI ``x-codeSamples`` (``/docs`` shows them with the
    service's address; with a token they send the one in ``$PTXSEG_TOKEN``)."""
    h = ' -H "Authorization: Bearer $PTXSEG_TOKEN"' if auth else ""
    b = EXAMPLE_BASE
    lines = {
        "/v1/predict": [
            f"curl -s{h} -F file=@xray.png {b}/v1/predict -o result.json",
            f"curl -s{h} --data-binary @xray.png '{b}/v1/predict?images=false'",
            f"curl -s{h} --data-binary @image.dcm '{b}/v1/predict?format=dicom-seg' "
            "-o image.seg.dcm",
        ],
        "/v1/model": [f"curl -s{h} {b}/v1/model"],
        "/healthz": [f"curl -s {b}/healthz"],
    }
    return {path: {"x-codeSamples": [{"lang": "Shell", "label": "curl",
                                      "source": "\n".join(text)}]}
            for path, text in lines.items()}  # fmt: skip


class Answer(JSONResponse):
    """A JSON answer that any parser reads: numbers that are not finite become ``null``
    (:func:`~ptxseg.serve.service.finite_json`)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(finite_json(content), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8")  # fmt: skip


def _error(request: Request, status: int, message: str,
           headers: dict[str, str] | None = None) -> Answer:  # fmt: skip
    detail = one_line(message)
    note(request, detail=detail)
    return Answer({"detail": detail}, status_code=status, headers=headers)


def create_app(service: Service, access: Access | None = None) -> FastAPI:
    """The app of a loaded :class:`Service`; its lifespan starts and closes the service.
    ``access``: the token and the ``Host`` names (default: no token, loopback names only)."""
    from ptxseg import __version__

    access = access or Access()

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
        default_response_class=Answer,
    )
    # outermost last: the access line sees every answer, the Host check comes before the token
    if access.token is not None:
        app.add_middleware(BearerAuth, token=access.token)
    app.add_middleware(HostCheck, hosts=access.hosts)
    app.add_middleware(RequestLog)
    app.state.service = service
    auth = access.token is not None
    viewer, viewer_csp = viewer_page(auth=auth)
    samples = code_samples(auth)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        return _error(request, 503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable):
        return _error(request, 503, str(exc), {"Connection": "close"})

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        return _error(request, 413, str(exc), {"Connection": "close"})

    @app.exception_handler(BodyTimeout)
    async def _slow(request: Request, exc: BodyTimeout):
        return _error(request, 408, str(exc), {"Connection": "close"})

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):  # nobody reads it: for the access line
        return _error(request, 499, str(exc), {"Connection": "close"})

    @app.exception_handler(BadUpload)
    async def _bad_upload(request: Request, exc: BadUpload):
        return _error(request, 400, str(exc))

    @app.exception_handler(NotDicom)
    async def _not_dicom(request: Request, exc: NotDicom):
        return _error(request, 415, str(exc))

    @app.exception_handler(PtxsegError)
    async def _bad_image(request: Request, exc: PtxsegError):
        status = 400
        if isinstance(exc, ModelOutputError):  # the model's fault, not the upload's
            status = 500
        elif isinstance(exc, UnsupportedImage):
            status = 413 if isinstance(exc, TooManyPixels) else 422
        return _error(request, status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _bad_query(request: Request, exc: RequestValidationError):
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in exc.errors()
        ]
        return _error(request, 422, "; ".join(problems) or "invalid request")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(viewer, headers={"Content-Security-Policy": viewer_csp})

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        text, policy = docs_page(app.openapi(), base_url=str(request.base_url), auth=auth)
        return HTMLResponse(text, headers={"Content-Security-Policy": policy})

    @app.get("/healthz", summary="Liveness and load", openapi_extra=samples["/healthz"])
    async def healthz() -> Answer:
        """`status` is `ok` while the model worker runs, else `dead` (HTTP 503, `worker` says
        why: restart the service); requests in it, bodies being received, the limits, what
        was refused, the batch sizes run so far. Needs no token."""
        health = service.health()
        return Answer(health, status_code=200 if health["status"] == "ok" else 503)

    @app.get("/v1/model", summary="The model served", openapi_extra=samples["/v1/model"])
    async def model_info() -> dict[str, Any]:
        """The run (folder name), architecture, encoder, input size, how many models (an
        ensemble's members, by run folder and file name, and how they combine), thresholds
        rule and its source, test-time augmentation, backend, device, ptxseg version and the
        service's limits."""
        return service.model_info()

    @app.post(
        "/v1/predict",
        summary="Segment one radiograph",
        response_model=Prediction,
        responses={
            200: {"content": {"application/dicom": {}},
                  "description": "JSON (format=json) or a DICOM SEG (format=dicom-seg)"},
            **{code: {"description": text} for code, text in ERRORS.items()},
        },  # fmt: skip
        openapi_extra={"requestBody": BODY_DOC, **samples["/v1/predict"]},
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
        service.check_alive()  # a stopped model worker: refused before the body is read
        body = await service.receive(request)  # an upload place, not yet a queue place
        with service.admitted():
            data, name = await service.run(image_of, body,
                                           request.headers.get("content-type", ""))  # fmt: skip
            del body
            upload = await service.run(service.decode, data, name)
            h, w = upload.image.shape[:2]
            note(request, image=f"{name}: {upload.format} {w}x{h}, {len(data):,} bytes")
            del data
            if format == "dicom-seg" and upload.dataset is None:
                raise NotDicom(
                    f"format=dicom-seg needs a DICOM upload (got a {upload.format} image)"
                )
            probs = await service.infer(upload)
            if format == "dicom-seg":
                seg = await service.run(service.dicom_seg, upload, probs)
                return Response(
                    seg, media_type="application/dicom",
                    headers={"Content-Disposition": 'attachment; filename="seg.dcm"'},
                )  # fmt: skip
            out = await service.run(functools.partial(service.result, upload, probs,
                                                      images=images))  # fmt: skip
        out["seconds"] = round(time.perf_counter() - t0, 4)
        return Answer(out)

    return app
