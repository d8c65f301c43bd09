from decimal import Decimal, InvalidOperation

from django.core.management.base import BaseCommand, CommandError

from billing_app import services


class Command(BaseCommand):
    help = "Set the price of MODEL in credits per million prompt and completion tokens."

    def add_arguments(self, parser):
        parser.add_argument("model")
        parser.add_argument("prompt_per_mtok")
        parser.add_argument("completion_per_mtok")

    def handle(self, *args, model: str, prompt_per_mtok: str, completion_per_mtok: str, **options):
        try:
            prompt, completion = Decimal(prompt_per_mtok), Decimal(completion_per_mtok)
        except InvalidOperation:
            raise CommandError("Prices must be numbers.") from None
        if not (prompt.is_finite() and completion.is_finite()):
            raise CommandError("Prices must be finite numbers.")
        try:
            price = services.set_price(model=model, prompt_per_mtok=prompt, completion_per_mtok=completion)
        except services.BillingError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"{price.model}: {price.prompt_price_per_mtok} prompt / "
                          f"{price.completion_price_per_mtok} completion credits per million tokens.")
