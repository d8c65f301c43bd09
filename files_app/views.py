from rest_framework import generics, status
from rest_framework.response import Response

from files_app import services
from files_app.models import UploadedFile
from files_app.serializers import FileSerializer


def _own_files(request):
    # The extracted text can be megabytes: API responses never load it.
    return UploadedFile.objects.filter(user=request.user).defer("text")


class FileListCreateView(generics.GenericAPIView):
    serializer_class = FileSerializer

    def get_queryset(self):
        return _own_files(self.request).order_by("-created_at", "-id")

    def initial(self, request, *args, **kwargs):
        if request.method == "POST":
            # Before authentication, which may parse the body for the CSRF check.
            services.install_upload_limit(request._request)
        super().initial(request, *args, **kwargs)

    def get(self, request):
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(FileSerializer(page, many=True).data)

    def post(self, request):
        services.check_declared_length(request.META)
        row = services.create_upload(user=request.user, files=request.FILES)
        return Response(FileSerializer(row).data, status=status.HTTP_201_CREATED)


class FileDetailView(generics.RetrieveDestroyAPIView):
    serializer_class = FileSerializer
    lookup_url_kwarg = "file_id"

    def get_queryset(self):
        return _own_files(self.request)

    def perform_destroy(self, instance: UploadedFile) -> None:
        services.delete_file(instance)
