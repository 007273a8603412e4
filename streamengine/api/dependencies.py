"""What every router of the admin API shares: the engine context, the bearer-token check, the model line
and version parameters, and the documented error responses."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from streamengine.api.context import EngineContext
from streamengine.api.models import ErrorBody
from streamengine.config.keys import release_signer
from streamengine.core.manifest import Signer
from streamengine.errors import ConfigError, NotFound, ServiceUnavailable

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in [(404, "Unknown model line, version or alias"), (422, "Invalid request")]
}
"""Error responses every route that names a model line or version documents."""

_bearer = HTTPBearer(auto_error=False, description="api.token (STREAMENGINE_API__TOKEN), when set")

ModelParam = Annotated[
    str | None,
    Query(max_length=200, description="Model line (default: the only one; required when there are several)."),
]
VersionParam = Annotated[
    str,
    Path(
        max_length=64,
        pattern=r"^(v\d+\.\d+|[a-z][a-z0-9_-]*)$",
        description="A version (v1.2) or an alias (production, previous, canary).",
    ),
]


class Unauthorized(Exception):
    """A mutating request without the configured bearer token (answered 401 by the error handlers)."""


class NotJson(Exception):
    """A mutating request without a token configured and without a JSON content type (answered 415)."""


def _engine(request: Request) -> EngineContext:
    ctx: EngineContext | None = request.app.state.ctx
    if ctx is None:
        raise ServiceUnavailable("engine", "admin API", "not connected")
    return ctx


Ctx = Annotated[EngineContext, Depends(_engine)]


def authorize(
    request: Request, ctx: Ctx, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Refuse a mutating request that a web page could have sent: without the configured bearer token
    (constant-time comparison) or, when no token is configured (loopback only), without a JSON content type.
    A page can send another origin only simple requests (forms, text/plain) without a CORS preflight, and this
    API grants none."""
    token = ctx.settings.api.token
    if token is not None:
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            raise Unauthorized()
    elif request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise NotJson()


MUTATING: dict[str, Any] = {
    "dependencies": [Depends(authorize)],
    "responses": {
        **ERRORS,
        401: {"model": ErrorBody, "description": "Missing or wrong bearer token"},
        409: {"model": ErrorBody, "description": "Conflicts with the current state"},
        415: {"model": ErrorBody, "description": "No token configured and the request is not application/json"},
    },
}
"""Keyword arguments of every mutating route: the token (or JSON) check and its documented error responses."""


def model_of(ctx: EngineContext, model: str | None) -> str:
    """The model line a request names; without one, the only line this engine serves. A :class:`ConfigError`
    listing the lines when several are served and none is named; NotFound when no name or pattern matches."""
    lines = ctx.lines
    if model is None:
        names, patterns = lines.names(), [e.pattern for _, e in lines.patterns]
        if len(names) == 1 and not patterns:
            return names[0]
        served = ", ".join([*names, *(p or "" for p in patterns)])
        raise ConfigError(f"model: this engine serves several model lines ({served}); name one (?model=, --model)")
    if not lines.matches(model):
        served = ", ".join([*lines.names(), *(e.pattern or "" for _, e in lines.patterns)])
        raise NotFound(f"model line '{model[:100]}' is not configured here (lines: {served})")
    return model


def signer(ctx: EngineContext) -> Signer | None:
    """What deploy and rollback announcements are signed with (the keys the settings name), if anything."""
    return release_signer(ctx.settings)
