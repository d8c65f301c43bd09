"""Background work of uploaded files, run by `python manage.py db_worker`."""

from django.tasks import task

from files_app import services


@task
def extract_file_text(file_id: str) -> str:
    """Extract the text of an uploaded file; marks it `ready` or `failed`. Safe to run twice."""
    return services.run_extraction(file_id)
