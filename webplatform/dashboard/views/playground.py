"""The playground: an image and a question, the answer streamed over /ws/chat/."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpResponse
from django.utils.translation import gettext as _

from tenants.selectors.tenants import tenant_limits_get
from webplatform.completions.model_choice import AUTO_MODEL, auto_offered
from webplatform.dashboard.access import OrgRequest, org_view
from webplatform.dashboard.views.common import render_page
from webplatform.uploads.errors import UploadErrorCode

ACCEPTED_TYPES = ["image/jpeg", "image/png", "image/webp", "image/gif"]


def error_explanations() -> dict[str, str]:
    """What each refusal code means, in the page's language (the same codes as the API)."""
    return {
        UploadErrorCode.IMAGE_TOO_LARGE: _("The image is larger than your plan allows."),
        UploadErrorCode.UNSUPPORTED_IMAGE_TYPE: _(
            "Only JPEG, PNG, WebP and GIF images are accepted (checked by content, not by name)."
        ),
        UploadErrorCode.IMAGE_DECODE_FAILED: _("The image is truncated or corrupt."),
        UploadErrorCode.IMAGE_TOO_MANY_PIXELS: _("The image has too many pixels."),
        UploadErrorCode.MALWARE_DETECTED: _("The virus scanner refused this file."),
        UploadErrorCode.TOO_MANY_IMAGES: _("Too many images in one request."),
        UploadErrorCode.INVALID_IMAGE_DATA: _("The image data could not be read."),
        UploadErrorCode.SCANNER_UNAVAILABLE: _(
            "The virus scanner is unavailable; please try again shortly."
        ),
        "rate_limit_exceeded": _("Too many requests per minute; wait a moment."),
        "tokens_quota_exceeded": _("Today's token quota is used up."),
        "concurrency_limit_exceeded": _("Too many requests at once; wait for one to finish."),
        "model_not_found": _("This model is not available to your organisation."),
        "context_length_exceeded": _("The question and image are too long for the model."),
        "model_overloaded": _("The model is busy; please retry in a few seconds."),
        "model_unavailable": _("The model is not available right now."),
        "insufficient_permissions": _("You are not a member of this organisation."),
        "request_in_progress": _("An answer is still streaming; stop it first."),
        "internal_error": _("Something went wrong on our side."),
        "connection_lost": _("The connection to the server was lost."),
    }


@org_view()
def playground(request: OrgRequest) -> HttpResponse:
    tenant = request.tenant
    limits = tenant_limits_get(tenant=tenant)
    config = {
        "tenant_id": tenant.pk,
        "ws_path": f"/ws/chat/?tenant={tenant.pk}",
        "api_base": request.build_absolute_uri("/v1"),
        # "auto": routing picks the fast or the slow model (model_choice); the start frame
        # names the one that answers.
        "models": [
            *limits.allowed_models,
            *([AUTO_MODEL] if auto_offered(limits.allowed_models) else []),
        ],
        "max_image_bytes": limits.max_image_bytes,
        "max_output_tokens": limits.max_output_tokens,
        "accepted_types": ACCEPTED_TYPES,
        "errors": error_explanations(),
        "i18n": {
            "too_large": _("This file is %(size)s; your plan accepts up to %(max)s."),
            "bad_type": _("This file type is not accepted: use JPEG, PNG, WebP or GIF."),
            "connecting": _("Connecting…"),
            "ready": _("Ready"),
            "streaming": _("Streaming…"),
            "taken_over": _("The server answering stopped; another one took over…"),
            "stopped": _("Stopped"),
            "done": _("Done"),
            "error": _("Error"),
            "need_question": _("Type a question."),
            "copied": _("Copied"),
        },
    }
    return render_page(
        request,
        "dashboard/playground.html",
        {"config": config, "scanning_on": bool(getattr(settings, "CLAMD_URL", ""))},
    )
