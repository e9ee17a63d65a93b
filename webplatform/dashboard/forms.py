"""Forms: parse and validate what the pages post; services do the writing."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any, cast

from django import forms
from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.forms import AuthenticationForm
from django.utils import timezone
from django.utils.functional import Promise, lazy
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from tenants.models import ApiKey, Membership, Plan
from tenants.services.content_logging import MAX_RETENTION_DAYS


def _choice_field(form: forms.Form, name: str) -> forms.ChoiceField:
    """A choice field of ``form`` whose choices are known only when the form is made."""
    field = form.fields[name]
    assert isinstance(field, forms.ChoiceField)
    return field


class SignUpForm(forms.Form):
    email = forms.EmailField(
        label=_("E-mail"),
        max_length=150,
        widget=forms.EmailInput(attrs={"autocomplete": "email"}),
    )
    organisation = forms.CharField(
        label=_("Organisation name"), max_length=200, help_text=_("Your company or team.")
    )
    password1 = forms.CharField(
        label=_("Password"),
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        # Lazy: built at class definition it would stay in the language of the first import.
        help_text=lazy(password_validation.password_validators_help_text_html, str)(),
    )
    password2 = forms.CharField(
        label=_("Password again"),
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )

    def __init__(self, *args: Any, invited_email: str | None = None, **kwargs: Any) -> None:
        """``invited_email``: signing up to accept an invitation. The person joins the
        inviting organisation, so no organisation name is asked, and the address is the
        invited one (prefilled, read-only)."""
        super().__init__(*args, **kwargs)
        if invited_email is not None:
            del self.fields["organisation"]
            self.fields["email"].initial = invited_email
            self.fields["email"].widget.attrs["readonly"] = True

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        password1, password2 = data.get("password1"), data.get("password2")
        if password1 and password2 and password1 != password2:
            self.add_error("password2", _("The two passwords differ."))
        elif password1 and data.get("email"):
            user = get_user_model()(username=data["email"], email=data["email"])
            try:
                password_validation.validate_password(password1, user)
            except forms.ValidationError as error:
                self.add_error("password1", error)
        return data


class OrganisationForm(forms.Form):
    name = forms.CharField(label=_("Organisation name"), max_length=200)


def role_choices(actor_role: str) -> list[tuple[str, str | Promise]]:
    """The roles an actor may grant: an owner any, an admin admin or member."""
    labels = {
        Membership.Role.MEMBER: _("Member"),
        Membership.Role.ADMIN: _("Admin"),
        Membership.Role.OWNER: _("Owner"),
    }
    roles = [Membership.Role.MEMBER, Membership.Role.ADMIN]
    if actor_role == Membership.Role.OWNER:
        roles.append(Membership.Role.OWNER)
    return [(role.value, labels[role]) for role in roles]


class InviteForm(forms.Form):
    email = forms.EmailField(
        label=_("E-mail"), widget=forms.EmailInput(attrs={"autocomplete": "email"})
    )
    role = forms.ChoiceField(label=_("Role"))

    def __init__(self, *args: Any, actor_role: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _choice_field(self, "role").choices = role_choices(actor_role)


class RoleForm(forms.Form):
    role = forms.ChoiceField(label=_("Role"))

    def __init__(self, *args: Any, actor_role: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _choice_field(self, "role").choices = role_choices(actor_role)


EXPIRY_CHOICES = [
    ("", _("Never")),
    ("7", _("In 7 days")),
    ("30", _("In 30 days")),
    ("90", _("In 90 days")),
    ("365", _("In a year")),
]


class ApiKeyForm(forms.Form):
    name = forms.CharField(label=_("Name"), max_length=100)
    models = forms.MultipleChoiceField(
        label=_("Models"),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text=_("None ticked: every model your plan allows."),
    )
    access = forms.ChoiceField(
        label=_("Access"),
        choices=[(ApiKey.Access.FULL, _("Full")), (ApiKey.Access.READ, _("Read only"))],
        initial=ApiKey.Access.FULL,
    )
    expires_in_days = forms.ChoiceField(label=_("Expires"), choices=EXPIRY_CHOICES, required=False)

    def __init__(self, *args: Any, models: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _choice_field(self, "models").choices = [(name, name) for name in models]

    def expires_at(self) -> Any:
        days = self.cleaned_data.get("expires_in_days")
        return timezone.now() + timedelta(days=int(days)) if days else None


class ApiKeyRenameForm(forms.Form):
    name = forms.CharField(label=_("New name"), max_length=100)


class PlanChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: Any) -> str:
        return gettext(obj.name)  # plan names are in the catalogue (labels.py)


class PlanForm(forms.Form):
    plan = PlanChoiceField(label=_("Plan"), queryset=Plan.objects.none(), empty_label=None)

    def __init__(self, *args: Any, plans: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cast(forms.ModelChoiceField, self.fields["plan"]).queryset = plans


class ContentLoggingForm(forms.Form):
    enabled = forms.BooleanField(label=_("Keep prompts and answers"), required=False)
    retention_days = forms.IntegerField(
        label=_("Keep them for (days)"), min_value=1, max_value=MAX_RETENTION_DAYS
    )


class DeleteOrganisationForm(forms.Form):
    confirm_name = forms.CharField(label=_("Type the organisation's name to confirm"))

    def __init__(self, *args: Any, expected_name: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected_name = expected_name

    def clean_confirm_name(self) -> str:
        value = self.cleaned_data["confirm_name"].strip()
        if value != self.expected_name:
            raise forms.ValidationError(_("The name does not match."))
        return value


class UsageFilterForm(forms.Form):
    key = forms.ChoiceField(label=_("API key"), required=False)
    model = forms.ChoiceField(label=_("Model"), required=False)

    def __init__(
        self,
        *args: Any,
        keys: list[tuple[str, str]],
        models: list[str],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        _choice_field(self, "key").choices = [("", _("All keys")), *keys]
        _choice_field(self, "model").choices = [("", _("All models"))] + [(m, m) for m in models]


class DateRangeForm(forms.Form):
    """The days a log page lists (UTC), both ends included; either may be left empty."""

    start = forms.DateField(
        label=_("From"), required=False, widget=forms.DateInput(attrs={"type": "date"})
    )
    end = forms.DateField(
        label=_("To"), required=False, widget=forms.DateInput(attrs={"type": "date"})
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        start, end = data.get("start"), data.get("end")
        if start and end and start > end:
            self.add_error("end", _("The end date is before the start date."))
        return data

    def bounds(self) -> tuple[Any, Any]:
        """``(since, before)``: UTC midnights, ``before`` the day after ``end``."""
        if not self.is_bound or not self.is_valid():
            return None, None
        start, end = self.cleaned_data.get("start"), self.cleaned_data.get("end")

        def midnight(day: Any) -> Any:
            return datetime.combine(day, time.min, tzinfo=UTC)

        return (
            midnight(start) if start else None,
            midnight(end + timedelta(days=1)) if end else None,
        )


class EmailLoginForm(AuthenticationForm):
    """Django's log-in form; its error names the e-mail address (our user name), not a
    "username" the page never asks for."""

    error_messages = {
        **AuthenticationForm.error_messages,
        "invalid_login": _(
            "Please enter a correct e-mail address and password. Note that the password is "
            "case-sensitive."
        ),
    }


class EmailChangeForm(forms.Form):
    email = forms.EmailField(
        label=_("New e-mail"),
        max_length=150,
        widget=forms.EmailInput(attrs={"autocomplete": "email"}),
    )
    password = forms.CharField(
        label=_("Current password"),
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )


class SpendLimitForm(forms.Form):
    limit = forms.DecimalField(
        label=_("Monthly spend limit (USD)"),
        required=False,
        min_value=0,
        max_digits=12,
        decimal_places=2,
        help_text=_("Empty: no limit. Reached, new requests are refused until next month."),
    )
