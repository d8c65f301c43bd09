from decimal import Decimal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from accounts.models import ApiKey
from billing_app import services
from billing_app.models import ModelPrice, Wallet

# Prices used when the operator has not set any (credits per million tokens).
DEFAULT_PRICES = {
    "fake/echo": (Decimal("10"), Decimal("20")),
    "openai/gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
}
DEMO_CREDITS = Decimal("10")


class Command(BaseCommand):
    help = "Local demo set-up: user 'demo' (password 'demo') with credits, a priced default model, a new API key."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")

    @transaction.atomic
    def handle(self, *args, username: str, **options):
        model = settings.PANTHEON_DEFAULT_MODEL
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
        _, raw = ApiKey.issue(user=user, name="demo (bin/run)")
        self.stdout.write(f"Demo login: {username} / {username} at /accounts/login/  (model: {model})")
        self.stdout.write("API key for the demo user (shown once):")
        self.stdout.write(raw)
