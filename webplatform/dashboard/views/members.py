"""Members and invitations."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from tenants.errors import ApplicationError
from tenants.models import Membership
from tenants.selectors.invitations import (
    invitation_get_by_token,
    invitation_get_for_tenant,
    invitation_list_pending,
)
from tenants.selectors.tenants import membership_get_for_tenant, membership_list_for_tenant
from tenants.services.invitations import invitation_accept, invitation_cancel, invitation_create
from tenants.services.members import membership_remove, membership_role_change
from webplatform.dashboard.access import CURRENT_TENANT_SESSION_KEY, OrgRequest, org_view
from webplatform.dashboard.forms import InviteForm, RoleForm
from webplatform.dashboard.views.common import form_error, render_page

INVITE_LINK_SESSION_KEY = "dashboard_invite_link"
# Backends that deliver nothing to the invited person (Django's console, dummy, and test one).
UNDELIVERED_BACKENDS = {
    "django.core.mail.backends.console.EmailBackend",
    "django.core.mail.backends.dummy.EmailBackend",
    "django.core.mail.backends.locmem.EmailBackend",
    "django.core.mail.backends.filebased.EmailBackend",
}


def email_configured() -> bool:
    return settings.EMAIL_BACKEND not in UNDELIVERED_BACKENDS


def _members_page(
    request: OrgRequest, *, invite_form: InviteForm | None = None, status: int = 200
) -> HttpResponse:
    tenant = request.tenant
    actor_role = request.membership.role
    flashed = request.session.pop(INVITE_LINK_SESSION_KEY, None)
    invite_link = flashed if flashed and flashed.get("tenant_id") == tenant.pk else None
    memberships = list(membership_list_for_tenant(tenant=tenant).order_by("created_at"))
    owners = sum(1 for m in memberships if m.role == Membership.Role.OWNER)
    rows = [
        {
            "membership": m,
            "role_form": RoleForm(actor_role=actor_role, initial={"role": m.role}),
            # An admin cannot touch an owner; nobody can demote or remove the last owner.
            "can_change": (actor_role == Membership.Role.OWNER or m.role != Membership.Role.OWNER)
            and not (m.role == Membership.Role.OWNER and owners == 1),
            "is_me": m.user_id == request.user.pk,
        }
        for m in memberships
    ]
    return render_page(
        request,
        "dashboard/members.html",
        {
            "rows": rows,
            "invitations": invitation_list_pending(tenant=tenant),
            "invite_form": invite_form or InviteForm(actor_role=actor_role),
            "invite_link": invite_link,
            "email_configured": email_configured(),
        },
        status=status,
    )


@org_view(Membership.Role.ADMIN)
def members(request: OrgRequest) -> HttpResponse:
    if request.method != "POST":
        return _members_page(request)
    actor_role = request.membership.role
    form = InviteForm(request.POST, actor_role=actor_role)
    if form.is_valid():
        try:
            created = invitation_create(
                tenant=request.tenant,
                email=form.cleaned_data["email"],
                role=form.cleaned_data["role"],
                invited_by=request.user,
                actor_role=actor_role,
                accept_url_for=lambda token: request.build_absolute_uri(
                    reverse("dashboard:invitation-accept", args=[token])
                ),
            )
        except ApplicationError as error:
            form_error(form, error)
        else:
            if email_configured():
                messages.success(
                    request,
                    _("Invitation sent to %(email)s.") % {"email": created.invitation.email},
                )
            else:
                # No mail server: the admin passes the link on; shown once, like a new key.
                request.session[INVITE_LINK_SESSION_KEY] = {
                    "tenant_id": request.tenant.pk,
                    "email": created.invitation.email,
                    "link": request.build_absolute_uri(
                        reverse("dashboard:invitation-accept", args=[created.token])
                    ),
                }
            return redirect("dashboard:members", request.tenant.pk)
    return _members_page(request, invite_form=form, status=400)


def _membership_or_404(request: OrgRequest, membership_id: int) -> Membership:
    try:
        return membership_get_for_tenant(
            tenant=request.tenant,
            membership_id=membership_id,
        )
    except ApplicationError as error:
        raise Http404(error.message) from error


@org_view(Membership.Role.ADMIN)
@require_POST
def member_role(request: OrgRequest, membership_id: int) -> HttpResponse:
    membership = _membership_or_404(request, membership_id)
    actor_role = request.membership.role
    form = RoleForm(request.POST, actor_role=actor_role)
    if not form.is_valid():
        messages.error(request, _("Choose a valid role."))
    else:
        try:
            membership_role_change(
                membership=membership,
                role=form.cleaned_data["role"],
                actor=request.user,
                actor_role=actor_role,
            )
        except ApplicationError as error:
            messages.error(request, error.message)
        else:
            messages.success(request, _("Role changed."))
    return redirect("dashboard:members", request.tenant.pk)


@org_view(Membership.Role.ADMIN)
def member_remove(request: OrgRequest, membership_id: int) -> HttpResponse:
    membership = _membership_or_404(request, membership_id)
    if request.method == "POST":
        try:
            membership_remove(
                membership=membership,
                actor=request.user,
                actor_role=request.membership.role,
            )
        except ApplicationError as error:
            messages.error(request, error.message)
        else:
            messages.success(request, _("Member removed."))
            if membership.user_id == request.user.pk:
                request.session.pop(CURRENT_TENANT_SESSION_KEY, None)
                return redirect("dashboard:home")
        return redirect("dashboard:members", request.tenant.pk)
    return render_page(request, "dashboard/member_remove.html", {"target": membership})


@org_view(Membership.Role.ADMIN)
@require_POST
def invitation_cancel_view(request: OrgRequest, invitation_id: int) -> HttpResponse:
    try:
        invitation = invitation_get_for_tenant(
            tenant=request.tenant,
            invitation_id=invitation_id,
        )
    except ApplicationError as error:
        raise Http404(error.message) from error
    invitation_cancel(invitation=invitation, actor=request.user)
    messages.success(request, _("Invitation cancelled."))
    return redirect("dashboard:members", request.tenant.pk)


def invitation_accept_view(request: HttpRequest, token: str) -> HttpResponse:
    """Anyone with the link sees which organisation invites them; accepting needs an account."""
    try:
        invitation = invitation_get_by_token(token=token)
    except ApplicationError as error:
        return render_page(
            request, "dashboard/invitation.html", {"error": error.message}, status=404
        )
    if request.method == "POST":
        if not request.user.is_authenticated:
            return redirect(f"{reverse('dashboard:login')}?next={request.path}")
        try:
            membership = invitation_accept(token=token, user=request.user)
        except ApplicationError as error:
            return render_page(
                request,
                "dashboard/invitation.html",
                {"error": error.message},
                status=error.status,
            )
        request.session[CURRENT_TENANT_SESSION_KEY] = membership.tenant_id
        messages.success(
            request, _("You joined %(organisation)s.") % {"organisation": membership.tenant.name}
        )
        return redirect("dashboard:overview", membership.tenant_id)
    return render_page(
        request, "dashboard/invitation.html", {"invitation": invitation, "token": token}
    )
