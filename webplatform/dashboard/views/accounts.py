"""Sign-up, log-in (with brute-force lock-out), log-out; password reset uses Django's views."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth import login, update_session_auth_hash
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import PasswordChangeForm
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.views.decorators.debug import sensitive_post_parameters

from tenants.errors import ApplicationError
from tenants.models import Invitation
from tenants.selectors.invitations import invitation_get_by_token
from tenants.services.accounts import (
    account_email_change,
    account_sign_up,
    account_sign_up_invited,
)
from tenants.services.login_throttle import (
    login_attempt_check,
    login_failure_record,
    login_success_reset,
)
from webplatform.dashboard.access import CURRENT_TENANT_SESSION_KEY, SignedInRequest
from webplatform.dashboard.forms import EmailChangeForm, EmailLoginForm, SignUpForm
from webplatform.dashboard.views.common import client_ip, form_error, render_page

AUTH_BACKEND = "django.contrib.auth.backends.ModelBackend"


def _safe_next(request: HttpRequest) -> str | None:
    target = request.POST.get("next") or request.GET.get("next")
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return None


def _invitation(request: HttpRequest) -> tuple[str, Invitation] | None:
    """The pending invitation a sign-up accepts (``?invitation=<token>``), if any."""
    token = request.POST.get("invitation") or request.GET.get("invitation") or ""
    if not token:
        return None
    try:
        return token, invitation_get_by_token(token=token)
    except ApplicationError:
        return None


@sensitive_post_parameters("password1", "password2")
def sign_up(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("dashboard:home")
    invited = _invitation(request)
    form = SignUpForm(request.POST or None, invited_email=invited[1].email if invited else None)
    if request.method == "POST" and form.is_valid():
        try:
            if invited is not None:
                membership = account_sign_up_invited(
                    token=invited[0],
                    email=form.cleaned_data["email"],
                    password=form.cleaned_data["password1"],
                )
                user, tenant = membership.user, membership.tenant
            else:
                signed_up = account_sign_up(
                    email=form.cleaned_data["email"],
                    password=form.cleaned_data["password1"],
                    organisation_name=form.cleaned_data["organisation"],
                )
                user, tenant = signed_up.user, signed_up.tenant
        except ApplicationError as error:
            form_error(form, error)
        else:
            login(request, user, backend=AUTH_BACKEND)
            request.session[CURRENT_TENANT_SESSION_KEY] = tenant.pk
            if invited is not None:
                messages.success(
                    request, _("You joined %(organisation)s.") % {"organisation": tenant.name}
                )
                return redirect("dashboard:overview", tenant.pk)
            messages.success(request, _("Welcome! Your organisation is ready."))
            return HttpResponseRedirect(
                _safe_next(request) or reverse("dashboard:overview", args=[tenant.pk])
            )
    return render_page(
        request,
        "accounts/signup.html",
        {
            "form": form,
            "next": _safe_next(request) or "",
            "invitation": invited[1] if invited else None,
            "invitation_token": invited[0] if invited else "",
        },
    )


class LoginView(auth_views.LoginView):
    """Django's log-in, refusing a client (IP and username) after repeated failures."""

    template_name = "accounts/login.html"
    authentication_form = EmailLoginForm
    redirect_authenticated_user = True

    def get_default_redirect_url(self) -> str:
        return reverse("dashboard:home")

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        ip, username = client_ip(request), request.POST.get("username", "")
        try:
            login_attempt_check(ip=ip, username=username)
        except ApplicationError as error:
            form = self.get_form()
            form.errors.clear()
            form.add_error(None, _("Too many failed log-in attempts. Please try again later."))
            response = self.render_to_response(self.get_context_data(form=form), status=429)
            for name, value in error.headers.items():
                response[name] = value
            return response
        return super().post(request, *args, **kwargs)

    def form_valid(self, form: Any) -> HttpResponse:
        login_success_reset(ip=client_ip(self.request), username=form.get_user().get_username())
        return super().form_valid(form)

    def form_invalid(self, form: Any) -> HttpResponse:
        login_failure_record(
            ip=client_ip(self.request), username=self.request.POST.get("username", "")
        )
        return super().form_invalid(form)


@login_required
@sensitive_post_parameters("password", "old_password", "new_password1", "new_password2")
def profile(request: SignedInRequest) -> HttpResponse:
    """The signed-in person's account: change the e-mail address (their log-in name) and the
    password. Each form posts with its own ``form`` value."""
    which = request.POST.get("form") if request.method == "POST" else None
    email_form = EmailChangeForm(
        request.POST if which == "email" else None, initial={"email": request.user.email}
    )
    password_form = PasswordChangeForm(request.user, request.POST if which == "password" else None)
    status = 200
    if which == "email":
        if email_form.is_valid():
            try:
                account_email_change(
                    user=request.user,
                    email=email_form.cleaned_data["email"],
                    password=email_form.cleaned_data["password"],
                )
            except ApplicationError as error:
                form_error(email_form, error)
            else:
                messages.success(request, _("Your e-mail address was changed."))
                return redirect("dashboard:profile")
        status = 400
    elif which == "password":
        if password_form.is_valid():
            password_form.save()
            update_session_auth_hash(request, password_form.user)  # stay signed in
            messages.success(request, _("Your password was changed."))
            return redirect("dashboard:profile")
        status = 400
    return render_page(
        request,
        "accounts/profile.html",
        {"email_form": email_form, "password_form": password_form},
        status=status,
    )
