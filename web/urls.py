from django.contrib.auth import views as auth_views
from django.urls import path

from web import views

app_name = "web"

urlpatterns = [
    path("", views.chat, name="chat"),
    path("accounts/login/", views.LoginView.as_view(), name="login"),  # rate limited: accounts.login_limit
    # Django's LogoutView answers POST only (a GET link could be forged by any page).
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
]
