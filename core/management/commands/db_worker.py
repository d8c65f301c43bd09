from django_tasks_db.management.commands.db_worker import Command as DatabaseWorkerCommand

from core.tasks import start_periodic_tasks


class Command(DatabaseWorkerCommand):
    """django-tasks-db's worker, which first queues Pantheon's periodic tasks (the turn
    sweep): running a worker is all the scheduling they need. Several workers are safe:
    a task already waiting is not queued again."""

    help = DatabaseWorkerCommand.help + ", after queueing Pantheon's periodic tasks (the turn sweep)"

    def handle(self, *args, **options):
        start_periodic_tasks()
        super().handle(*args, **options)
