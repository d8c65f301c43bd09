from decimal import Decimal, InvalidOperation

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from billing_app import services


class Command(BaseCommand):
    help = "Grant AMOUNT credits to USERNAME's wallet."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("amount")
        parser.add_argument("--note", default="", help="Shown in the ledger.")

    def handle(self, *args, username: str, amount: str, note: str, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user named {username!r}.")
        try:
            value = Decimal(amount)
        except InvalidOperation:
            raise CommandError(f"Amount must be a number, not {amount!r}.") from None
        try:
            entry = services.grant(user_id=user.pk, amount=value, note=note or "granted by grant_credits")
        except services.BillingError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Granted {entry.amount} credits to {username}; balance {entry.balance_after}.")
