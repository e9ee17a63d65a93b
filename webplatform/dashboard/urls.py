"""Dashboard and account URLs; included at the site root by ``webplatform.urls``."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import include, path, reverse_lazy

from webplatform.dashboard.views import accounts, keys, members, organisations, playground, usage

app_name = "dashboard"

_reset = {
    "email_template_name": "accounts/password_reset_email.txt",
    "subject_template_name": "accounts/password_reset_subject.txt",
    "template_name": "accounts/password_reset.html",
    "success_url": reverse_lazy("dashboard:password-reset-done"),
}

account_patterns = [
    path("signup/", accounts.sign_up, name="signup"),
    path("login/", accounts.LoginView.as_view(), name="login"),
    path("profile/", accounts.profile, name="profile"),
    path("logout/", auth_views.LogoutView.as_view(next_page="dashboard:login"), name="logout"),
    path("password-reset/", auth_views.PasswordResetView.as_view(**_reset), name="password-reset"),
    path(
        "password-reset/sent/",
        auth_views.PasswordResetDoneView.as_view(template_name="accounts/password_reset_done.html"),
        name="password-reset-done",
    ),
    path(
        "reset/<uidb64>/<token>/",
        auth_views.PasswordResetConfirmView.as_view(
            template_name="accounts/password_reset_confirm.html",
            success_url=reverse_lazy("dashboard:password-reset-complete"),
        ),
        name="password-reset-confirm",
    ),
    path(
        "reset/done/",
        auth_views.PasswordResetCompleteView.as_view(
            template_name="accounts/password_reset_complete.html"
        ),
        name="password-reset-complete",
    ),
]

org_patterns = [
    path("", organisations.overview, name="overview"),
    path("playground/", playground.playground, name="playground"),
    path("usage/", usage.usage, name="usage"),
    path("usage.csv", usage.usage_csv, name="usage-csv"),
    path("requests/", usage.request_log, name="requests"),
    path("requests/<str:request_id>/", usage.request_detail, name="request-detail"),
    path("audit/", usage.audit_log, name="audit"),
    path("keys/", keys.keys, name="keys"),
    path("keys/<str:public_id>/revoke/", keys.key_revoke, name="key-revoke"),
    path("keys/<str:public_id>/rename/", keys.key_rename, name="key-rename"),
    path("members/", members.members, name="members"),
    path("members/<int:membership_id>/role/", members.member_role, name="member-role"),
    path("members/<int:membership_id>/remove/", members.member_remove, name="member-remove"),
    path(
        "invitations/<int:invitation_id>/cancel/",
        members.invitation_cancel_view,
        name="invitation-cancel",
    ),
    path("settings/", organisations.org_settings, name="settings"),
    path("settings/plan/", organisations.plan_change, name="plan-change"),
    path("settings/name/", organisations.org_rename, name="org-rename"),
    path("settings/spend-limit/", organisations.spend_limit, name="spend-limit"),
    path("settings/content-logging/", organisations.content_logging, name="content-logging"),
    path("delete/", organisations.org_delete, name="org-delete"),
]

urlpatterns = [
    path("", organisations.home, name="home"),
    # Browsers ask for /favicon.ico before reading a page's <link rel="icon">.
    path("favicon.ico", organisations.favicon, name="favicon"),
    path("accounts/", include(account_patterns)),
    path("orgs/new/", organisations.org_create, name="org-create"),
    path("orgs/switch/", organisations.org_switch, name="org-switch"),
    path("orgs/<int:tenant_id>/", include(org_patterns)),
    path("invitations/<str:token>/", members.invitation_accept_view, name="invitation-accept"),
    # The language switcher posts here (Django's set_language view).
    path("i18n/", include("django.conf.urls.i18n")),
]
