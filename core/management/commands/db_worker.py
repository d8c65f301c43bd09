from django_tasks_db.management.commands.db_worker import Command as DatabaseWorkerCommand

from core.tasks import start_periodic_tasks


class Command(DatabaseWorkerCommand):
    """django-tasks-db's worker, which first queues Pantheon's periodic tasks (the turn
    sweep): running a worker is all the scheduling they need. Several workers are safe:
    a task already waiting is not queued again.

    Unlike the library's command it serves every queue by default ("default": the sweep and
    reconciliation; "files": text extraction), so one plain `db_worker` still runs all
    background work; production runs one worker per queue (`--queue-name default` and
    `--queue-name files`) so the sweep never waits behind an extraction (docs/files.md)."""

    help = DatabaseWorkerCommand.help + ", after queueing Pantheon's periodic tasks (the turn sweep)"

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.set_defaults(queue_name="*")

    def handle(self, *args, **options):
        start_periodic_tasks()
        super().handle(*args, **options)
