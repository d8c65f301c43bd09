from django.apps import AppConfig


class SessionsAppConfig(AppConfig):
    name = "sessions_app"
    verbose_name = "Chat sessions"

    def ready(self) -> None:
        from core.tasks import register_periodic
        from sessions_app.tasks import schedule_sweep

        # Every db_worker keeps the turn sweep running, every PANTHEON_TURN_LEASE_SECONDS.
        register_periodic(schedule_sweep)
