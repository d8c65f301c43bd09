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
                           "`POST /api/v1/keys` (or the chat page's keys panel, `manage.py create_api_key`, "
                           "the admin), shown once, may carry limits (SPEC section 16), and are revoked "
                           "with `DELETE /api/v1/keys/{id}` (or in the admin).",
        }
