from django.urls import path

from files_app import views

# Included at /api/v1/files.
urlpatterns = [
    path("", views.FileListCreateView.as_view(), name="files"),
    path("/<uuid:file_id>", views.FileDetailView.as_view(), name="file-detail"),
]
