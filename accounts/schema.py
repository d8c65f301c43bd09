"""How the OpenAPI schema (drf-spectacular) describes Bearer API keys: registered when the
app is ready (accounts.apps), so every view authenticated by `ApiKeyAuthentication` lists
the `bearerAuth` security scheme beside Django's session cookie (`cookieAuth`)."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.ApiKeyAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key: `Authorization: Bearer <key>`. Keys are made with "
                           "`manage.py create_api_key USERNAME` (or in the admin), shown once, and "
                           "can be revoked in the admin.",
        }
