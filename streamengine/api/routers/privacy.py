"""Privacy: forget a user (delete their stored samples and report the versions trained on them)."""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter

from streamengine import metrics
from streamengine.api.dependencies import MUTATING, Ctx
from streamengine.api.models import ForgetRequest, ForgetResponse
from streamengine.store import privacy

log = logging.getLogger(__name__)

router = APIRouter(tags=["privacy"])


@router.post("/users/forget", response_model=ForgetResponse, **MUTATING)
async def forget_user(ctx: Ctx, request: ForgetRequest) -> ForgetResponse:
    """Delete every stored sample of a user (all model lines); report the versions trained on them.

    Released adapters are not unlearned: `trained_on` lists the versions whose window held the samples,
    `later_versions` those that continue from them (and whose replay may have drawn them). The next
    versions no longer see the data. The user id travels in the body, not the path, to stay out of
    access logs; the engine logs the request by `request_id`, without the user id."""
    request_id = uuid.uuid4().hex[:16]
    result = await privacy.forget_user(ctx.db, request.user_id)
    metrics.FORGET_REQUESTS.inc()
    metrics.SAMPLES_FORGOTTEN.inc(result.deleted_samples)
    log.info(
        "forget request %s: %d samples deleted from windows %s; versions trained on them: %s;"
        " later versions: %s; running jobs: %s",
        request_id,
        result.deleted_samples,
        result.windows or "-",
        ", ".join(f"{a.model} {a.version}" for a in result.trained_on) or "-",
        ", ".join(f"{a.model} {a.version}" for a in result.later_versions) or "-",
        result.running_jobs or "-",
    )
    return ForgetResponse(request_id=request_id, **result.as_dict())
