from datetime import timedelta
from decimal import Decimal, InvalidOperation

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from accounts.models import ApiKey, BudgetPeriod


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise CommandError(f"--budget: {text!r} is not a number.") from None
    if not value.is_finite():
        raise CommandError(f"--budget: {text!r} is not a number.")
    return value


def _messages(error: ValidationError) -> str:
    if hasattr(error, "error_dict"):
        return "; ".join(f"{field}: {' '.join(messages)}" if field != "__all__" else " ".join(messages)
                         for field, messages in error.message_dict.items())
    return " ".join(error.messages)


def summary(key: ApiKey) -> str:
    """The key's limits in one line, for the operator (never the key itself)."""
    parts = [f"rpm {key.rpm}" if key.rpm is not None else "",
             f"tpm {key.tpm}" if key.tpm is not None else "",
             f"max parallel {key.max_parallel}" if key.max_parallel is not None else "",
             f"budget {key.budget:f} per {key.budget_period}" if key.budget is not None else "",
             f"models {', '.join(key.allowed_models)}" if key.allowed_models is not None else "",
             f"expires {key.expires_at.isoformat()}" if key.expires_at is not None else ""]
    limits = ", ".join(part for part in parts if part) or "no limits"
    return f"Key {key.prefix}… {key.name or '(no name)'!s} for {key.user.get_username()!r}: {limits}."


class Command(BaseCommand):
    help = ("Create an API key for USERNAME, optionally with limits (SPEC section 16), and print it: the key "
            "is the last line of output; a summary of its limits goes to stderr.")

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--create-user", action="store_true", help="Create the user if it does not exist.")
        parser.add_argument("--name", default="", help="A label for the key.")
        parser.add_argument("--rpm", type=int, help="Turns the key may start per rolling 60 seconds.")
        parser.add_argument("--tpm", type=int, help="Tokens (prompt + completion) per rolling 60 seconds.")
        parser.add_argument("--max-parallel", type=int, help="Turns running at once.")
        parser.add_argument("--budget", type=_decimal, help="Credits the key may spend per --budget-period.")
        parser.add_argument("--budget-period", choices=BudgetPeriod.values,
                            help="Calendar day, week (from Monday) or month in UTC, or total.")
        parser.add_argument("--models", help="The only models the key may use, comma-separated: M1,M2.")
        parser.add_argument("--expires-in-days", type=int, help="The key is refused after now + N x 24 h.")

    def handle(self, *args, username: str, create_user: bool, name: str, **options):
        limits = {field: options[field] for field in ("rpm", "tpm", "max_parallel", "budget")}
        limits["budget_period"] = options["budget_period"] or ""
        if options["models"] is not None:
            models = list(dict.fromkeys(m.strip() for m in options["models"].split(",") if m.strip()))
            if not models:
                raise CommandError("--models: give at least one model name (M1,M2).")
            limits["allowed_models"] = models
        days = options["expires_in_days"]
        if days is not None:
            if days < 1:
                raise CommandError("--expires-in-days must be at least 1.")
            try:
                limits["expires_at"] = timezone.now() + timedelta(days=days)
            except OverflowError:
                raise CommandError("--expires-in-days is too large.") from None

        # Validated as the model validates a key, before anything is written.
        try:
            ApiKey(name=name, **limits).full_clean(exclude=["user", "prefix", "key_hash"])
        except ValidationError as exc:
            raise CommandError(f"Invalid key: {_messages(exc)}") from None

        User = get_user_model()
        with transaction.atomic():
            user = User.objects.filter(username=username).first()
            if user is None:
                if not create_user:
                    raise CommandError(f"No user named {username!r} (use --create-user to create one).")
                user = User.objects.create_user(username=username)
                self.stderr.write(f"Created user {username!r} (no password; set one with changepassword).")
            key, raw = ApiKey.issue(user=user, name=name)
            for field, value in limits.items():
                setattr(key, field, value)
            key.save(update_fields=list(limits))
        self.stderr.write(summary(key))
        self.stdout.write(raw)
