"""The endpoint's error answers: each kind of error mapped to its status in one handler, in its route's API shape.

Routes and stages raise; nothing builds an error response by hand. :func:`install` registers one FastAPI exception
handler per kind:

- :class:`serving.auth.AuthError` → 401 (with ``WWW-Authenticate``) or 403;
- :class:`serving.core.RequestError` → its 4xx (a request refused, naming the field or limit; raised by the ingress
  or by a stage: a filter the index cannot apply) or 504 (past ``limits.request_timeout_s``);
- FastAPI's ``RequestValidationError`` (a body or parameter that does not fit the route's model) → 422 naming each
  field (400 on OpenAI's route, as OpenAI answers);
- :class:`serving.core.NotReady` (a stage still loading, in every generation the ingress may use) and Ray Serve's
  ``BackPressureError`` (a stage's queue is full) → 503 with Retry-After, counted by reason.

The shape is the route's API's (:mod:`ray_vdr.protocol`): OpenAI's ``{"error": {...}}`` on ``/v1/embeddings``, so
its client raises ``BadRequestError``, ``AuthenticationError``…; ray-vdr's ``{"detail": "..."}`` everywhere else.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.serve.exceptions import BackPressureError

from ray_vdr.protocol import ErrorResponse, OpenAIErrorResponse
from serving import core, openai_api
from serving.auth import AuthError

__all__ = ["ERRORS", "OPENAI_ERRORS", "error_response", "install"]

# the error answers each route documents in the OpenAPI schema
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (401, 403, 404, 413, 422, 503, 504)}
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": OpenAIErrorResponse}
                                                  for s in (400, 401, 403, 413, 503, 504)}


def error_response(request: Request, status: int, message: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    """An error in the route's API shape: OpenAI's on ``/v1/embeddings``, ray-vdr's ``{"detail": ...}`` elsewhere."""
    if request.url.path.endswith("/v1/embeddings"):
        body: ErrorResponse | OpenAIErrorResponse = OpenAIErrorResponse.of(status, message,
                                                                          openai_api.error_param(message))
    else:
        body = ErrorResponse(detail=message)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def _denied(request: Request, e: AuthError) -> JSONResponse:
    """The message names what is missing, never the key."""
    return error_response(request, e.status, str(e), {"WWW-Authenticate": "Bearer"} if e.status == 401 else None)


async def _refused(request: Request, e: core.RequestError) -> JSONResponse:
    return error_response(request, e.status, str(e))


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    problems = []
    for err in e.errors():
        loc = [str(p) for p in err.get("loc", ())]
        where = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
        problems.append("the body is not valid JSON" if err.get("type") == "json_invalid"
                        else f"{where or 'body'}: {err.get('msg')}")
    status = 400 if request.url.path.endswith("/v1/embeddings") else 422
    return error_response(request, status, "; ".join(problems) or "invalid request")


def _unavailable(request: Request, reason: str, message: str) -> JSONResponse:
    """503 + Retry-After, counted by reason (the ingress keeps its metrics and limits in ``app.state``)."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.unavailable(reason)
    return error_response(request, 503, message, {"Retry-After": str(request.app.state.retry_after_s)})


async def _not_ready(request: Request, e: core.NotReady) -> JSONResponse:
    """The one place a NotReady becomes an answer: the ingress raises it only when no generation it may use has
    loaded (it falls back to the previous generation first)."""
    return _unavailable(request, "not_ready", f"not ready: {e}")


async def _over_capacity(request: Request, e: BackPressureError) -> JSONResponse:
    return _unavailable(request, "over_capacity", "over capacity: too many requests in flight, retry later")


def install(app: FastAPI) -> None:
    """Register the handlers on the ingress's app."""
    for kind, handler in ((AuthError, _denied), (core.RequestError, _refused), (RequestValidationError, _invalid),
                          (core.NotReady, _not_ready), (BackPressureError, _over_capacity)):
        app.add_exception_handler(kind, handler)  # type: ignore[arg-type]
