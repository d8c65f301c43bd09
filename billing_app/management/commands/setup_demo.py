import os
from decimal import Decimal
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from accounts.models import ApiKey, hash_key
from billing_app import services
from billing_app.models import ModelPrice, Wallet

# Prices used when the operator has not set any (credits per million tokens).
DEFAULT_PRICES = {
    "fake/echo": (Decimal("10"), Decimal("20")),
    "openai/gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
}
DEMO_CREDITS = Decimal("10")


DEMO_KEY_NAME = "demo (bin/run)"


class Command(BaseCommand):
    help = ("Local demo set-up: user 'demo' (password 'demo') with credits, a priced default model, and an API "
            "key: with --key-file, the key kept in that file while it is still active, else a new one (older "
            "demo keys are revoked).")

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")
        parser.add_argument("--key-file", type=Path, default=None,
                            help="Keep the raw key in this file (mode 0600) and reuse it on the next run while "
                                 "its key is active (bin/run: .demo-key).")

    def handle(self, *args, username: str, key_file: Path | None, **options):
        model = settings.PANTHEON_DEFAULT_MODEL
        raw, reused = self._set_up(username, model, _read_key(key_file))
        if key_file is not None and not reused:
            _write_key(key_file, raw)  # after the commit: the file never names a key that was rolled back
        self.stdout.write(f"Demo login: {username} / {username} at /accounts/login/  (model: {model})")
        if key_file is None:
            self.stdout.write("API key for the demo user (shown once):")
        elif reused:
            self.stdout.write(f"API key for the demo user (the same as before, kept in {key_file}):")
        else:
            self.stdout.write(f"API key for the demo user (new, kept in {key_file}):")
        self.stdout.write(raw)

    @transaction.atomic
    def _set_up(self, username: str, model: str, kept: str | None) -> tuple[str, bool]:
        """The demo user, credits, price; returns (raw key, whether `kept` was reused)."""
        if not ModelPrice.objects.filter(model=model).exists():
            prompt, completion = DEFAULT_PRICES.get(model, DEFAULT_PRICES["openai/gpt-4o-mini"])
            services.set_price(model=model, prompt_per_mtok=prompt, completion_per_mtok=completion)
            self.stdout.write(f"Priced {model}: {prompt} / {completion} credits per million tokens.")
        User = get_user_model()
        user, created = User.objects.get_or_create(username=username)
        if created:
            user.set_password(username)
            user.save()
        wallet = Wallet.objects.filter(user=user).first()
        if wallet is None or wallet.balance <= 0:
            services.grant(user_id=user.pk, amount=DEMO_CREDITS, note="demo credits")
        if kept and ApiKey.objects.active().filter(user=user, key_hash=hash_key(kept)).exists():
            return kept, True
        # One demo key at a time: the ones minted before (a lost key file, a new database) go.
        ApiKey.objects.active().filter(user=user, name=DEMO_KEY_NAME).update(revoked_at=timezone.now())
        _, raw = ApiKey.issue(user=user, name=DEMO_KEY_NAME)
        return raw, False


def _read_key(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text().strip() or None
    except (FileNotFoundError, PermissionError, UnicodeDecodeError):
        return None


def _write_key(path: Path, raw: str) -> None:
    """Write the key readable by its owner only, replacing the file in one step."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(raw + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
