"""The chat page. It is a shell: the page's script talks to the JSON API (`/api/v1/...`)
with the browser's session cookie and the CSRF token, and streams turns over SSE."""

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_safe

from accounts.login_limit import LoginForm


@require_safe
@login_required
@ensure_csrf_cookie  # the script reads the `csrftoken` cookie for its X-CSRFToken header
def chat(request: HttpRequest) -> HttpResponse:
    return render(request, "web/chat.html", {
        "default_model": settings.PANTHEON_DEFAULT_MODEL,
        "provider": settings.PANTHEON_LLM_PROVIDER,
    })


class LoginView(auth_views.LoginView):
    """Django's login page with the login rate limit (accounts.login_limit): a refused
    attempt is answered 429 with `Retry-After` and the form saying how long to wait."""

    form_class = LoginForm
    template_name = "web/login.html"
    redirect_authenticated_user = True

    def form_invalid(self, form):
        response = super().form_invalid(form)
        if form.refused is not None:
            response.status_code = 429
            response["Retry-After"] = str(form.refused.retry_after)
        return response
