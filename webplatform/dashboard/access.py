"""Who may open an organisation's pages.

Every organisation page lives under ``/orgs/<tenant_id>/`` and is wrapped by ``org_view``:

- anonymous: redirected to the log-in page;
- not a member of that organisation (or no such organisation): 404, never a hint that it
  exists;
- a member whose role is below the page's: 403;
- otherwise the view runs with ``request.tenant`` and ``request.membership`` set, and the
  organisation becomes the session's current one (``current_tenant_id``).

Such a view takes an ``OrgRequest``: the type that says so.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse

from tenants.models import Membership, Tenant
from tenants.selectors.tenants import membership_get
from tenants.services.members import role_at_least

CURRENT_TENANT_SESSION_KEY = "current_tenant_id"

View = Callable[..., HttpResponse]


class SignedInRequest(HttpRequest):
    """The request of a page behind ``login_required``: its user is signed in. A type only
    (the object is Django's own request)."""

    user: User


class OrgRequest(SignedInRequest):
    """The request of an organisation page as ``org_view`` hands it to the view: a signed-in
    user who is a member of ``tenant``. A type only: the object is Django's own request, on
    which ``org_view`` sets ``tenant`` and ``membership``."""

    tenant: Tenant
    membership: Membership


def org_view(role: str = Membership.Role.MEMBER) -> Callable[[View], View]:
    def decorate(view: View) -> View:
        @login_required
        @functools.wraps(view)
        def wrapper(
            request: HttpRequest, tenant_id: int, *args: Any, **kwargs: Any
        ) -> HttpResponse:
            membership = membership_get(tenant_id=tenant_id, user=request.user)
            if membership is None:
                raise Http404("No such organisation.")
            if not role_at_least(membership.role, role):
                raise PermissionDenied("Your role in this organisation does not allow this page.")
            org_request = cast(OrgRequest, request)
            org_request.tenant = membership.tenant
            org_request.membership = membership
            if request.session.get(CURRENT_TENANT_SESSION_KEY) != membership.tenant_id:
                request.session[CURRENT_TENANT_SESSION_KEY] = membership.tenant_id
            return view(org_request, *args, **kwargs)

        return wrapper

    return decorate
