from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view, inline_serializer
from rest_framework import generics, serializers, status
from rest_framework.response import Response

from core.schema import errors
from files_app import services
from files_app.models import UploadedFile
from files_app.serializers import FileSerializer


def _own_files(request):
    # The extracted text can be megabytes: API responses never load it.
    return UploadedFile.objects.filter(user=request.user).defer("text")


@extend_schema_view(
    get=extend_schema(operation_id="files_list", tags=["files"],
                      responses={200: FileSerializer(many=True), **errors(401, (404, "No such page."))}),
    post=extend_schema(
        operation_id="files_create", tags=["files"],
        description="Upload one file as the multipart field `file`. Its text is extracted in the background: "
                    "`status` goes from `pending` to `ready` or `failed`.",
        request={"multipart/form-data": inline_serializer("FileUpload", {"file": serializers.FileField()})},
        responses={201: FileSerializer,
                   **errors((400, "No file, more than one, an empty file or an unsupported type (`file_required`, "
                                  "`too_many_files`, `empty_file`, `unsupported_file_type`)."),
                            401, 403, 413, (503, "The file could not be stored (`storage_unavailable`)."))},
    ),
)
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


@extend_schema_view(
    get=extend_schema(operation_id="files_retrieve", tags=["files"], responses={200: FileSerializer,
                                                                               **errors(401, 404)}),
    delete=extend_schema(operation_id="files_destroy", tags=["files"],
                         responses={204: OpenApiResponse(description="Deleted."), **errors(401, 403, 404)}),
)
class FileDetailView(generics.RetrieveDestroyAPIView):
    serializer_class = FileSerializer
    lookup_url_kwarg = "file_id"

    def get_queryset(self):
        return _own_files(self.request)

    def perform_destroy(self, instance: UploadedFile) -> None:
        services.delete_file(instance)
