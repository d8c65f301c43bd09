from decimal import Decimal, InvalidOperation

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from billing_app import services
from billing_app.models import ModelPrice


def validation_message(exc: ValidationError) -> str:
    """A ValidationError as one line: "field: message" for each message."""
    if hasattr(exc, "error_dict"):
        return " ".join(f"{field}: {' '.join(messages)}" if field != "__all__" else " ".join(messages)
                        for field, messages in exc.message_dict.items())
    return " ".join(exc.messages)


def route_summary(price: ModelPrice) -> str:
    """Where the model is served, for the command's answer; empty for the plain default route."""
    parts = []
    if price.provider_id is not None:
        parts.append(f"provider {price.provider.name}")
    if price.upstream_model:
        parts.append(f"upstream model {price.upstream_model}")
    if price.fallbacks:
        parts.append(f"fallbacks {', '.join(price.fallbacks)}")
    return f" ({'; '.join(parts)})" if parts else ""


class Command(BaseCommand):
    help = ("Set the price of MODEL in credits per million prompt and completion tokens, and optionally where "
            "it is served. Route options not given keep their current values.")

    def add_arguments(self, parser):
        parser.add_argument("model")
        parser.add_argument("prompt_per_mtok")
        parser.add_argument("completion_per_mtok")
        parser.add_argument("--provider", help="A provider added with add_provider; default, openrouter or fake "
                                               "mean the provider the settings configure.")
        parser.add_argument("--upstream-model", help="The provider's id of this model; \"\" means the same as "
                                                     "its name.")
        parser.add_argument("--fallbacks", help="Comma-separated priced models tried in order when this one "
                                                "fails; \"\" clears them.")

    def handle(self, *args, model: str, prompt_per_mtok: str, completion_per_mtok: str, **options):
        try:
            prompt, completion = Decimal(prompt_per_mtok), Decimal(completion_per_mtok)
        except InvalidOperation:
            raise CommandError("Prices must be numbers.") from None
        if not (prompt.is_finite() and completion.is_finite()):
            raise CommandError("Prices must be finite numbers.")
        route = {}
        if options.get("provider") is not None:
            route["provider"] = options["provider"]
        if options.get("upstream_model") is not None:
            route["upstream_model"] = options["upstream_model"].strip()
        if options.get("fallbacks") is not None:
            route["fallbacks"] = [name.strip() for name in options["fallbacks"].split(",") if name.strip()]
        try:
            price = services.set_price(model=model, prompt_per_mtok=prompt, completion_per_mtok=completion, **route)
        except services.BillingError as exc:
            raise CommandError(str(exc)) from None
        except ValidationError as exc:
            raise CommandError(validation_message(exc)) from None
        self.stdout.write(f"{price.model}: {price.prompt_price_per_mtok} prompt / "
                          f"{price.completion_price_per_mtok} completion credits per million tokens"
                          f"{route_summary(price)}.")
