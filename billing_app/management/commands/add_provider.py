import math

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from billing_app.management.commands.set_price import validation_message
from billing_app.models import Provider


def key_source(provider: Provider) -> str:
    """Where the provider's key comes from, never the key itself."""
    if provider.api_key_env:
        return f"key from ${provider.api_key_env}"
    return "key stored" if provider.api_key else "no key"


class Command(BaseCommand):
    help = ("Add an OpenAI-compatible provider (vLLM, Ollama, llama.cpp, another OpenRouter account) that "
            "set_price --provider can route models to, or update the one of that name. Options not given keep "
            "their current values.")

    def add_arguments(self, parser):
        parser.add_argument("name", help="Lower-case letters, digits, '.', '_' and '-'; not openrouter or fake.")
        parser.add_argument("base_url", help="The API root, e.g. http://127.0.0.1:8000/v1.")
        key = parser.add_mutually_exclusive_group()
        key.add_argument("--api-key-env", metavar="VAR",
                         help="The environment variable holding the key (preferred: the key stays out of the "
                              "database); \"\" for none.")
        key.add_argument("--api-key", metavar="KEY",
                         help="The key itself, stored in the database (it also lands in your shell history: "
                              "prefer --api-key-env); \"\" for none.")
        parser.add_argument("--timeout", type=float, metavar="SECONDS",
                            help="Connect/read timeout (default: PANTHEON_UPSTREAM_TIMEOUT_SECONDS).")

    def handle(self, *args, name: str, base_url: str, **options):
        api_key_env, api_key, timeout = options.get("api_key_env"), options.get("api_key"), options.get("timeout")
        provider = Provider.objects.filter(name=name).first()
        created = provider is None
        if created:
            provider = Provider(name=name)
        provider.base_url = base_url
        # Each key option replaces the other one's value: a provider has one key source.
        if api_key_env is not None:
            provider.api_key_env = api_key_env.strip()
            provider.api_key = "" if api_key is None else api_key
        elif api_key is not None:
            provider.api_key, provider.api_key_env = api_key, ""
        if timeout is not None:
            if not math.isfinite(timeout):  # NaN passes the model's range validators
                raise CommandError("The timeout must be a finite number of seconds.")
            provider.timeout_seconds = timeout
        try:
            provider.full_clean()
        except ValidationError as exc:
            # The messages name fields and rules, never a value, so the key is not echoed.
            raise CommandError(validation_message(exc)) from None
        provider.save()
        timeout_text = f"timeout {provider.timeout_seconds:g}s" if provider.timeout_seconds else "default timeout"
        self.stdout.write(f"{'Created' if created else 'Updated'} provider {provider.name}: {provider.base_url}, "
                          f"{key_source(provider)}, {timeout_text}.")
