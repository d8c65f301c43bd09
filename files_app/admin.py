from django.contrib import admin, messages
from django.db.models.functions import Substr
from django.template.defaultfilters import filesizeformat

from files_app import services
from files_app.models import UploadedFile

PREVIEW_CHARS = 2000


@admin.register(UploadedFile)
class UploadedFileAdmin(admin.ModelAdmin):
    list_display = ["filename", "user", "status", "content_type", "human_size", "text_length", "truncated",
                    "created_at"]
    list_filter = ["status", "truncated", "content_type", "created_at"]
    search_fields = ["filename", "user__username", "id"]
    list_select_related = ["user"]
    date_hierarchy = "created_at"
    ordering = ["-created_at"]
    # Everything but the name is the system's record of the upload and its extraction.
    fields = ["id", "user", "filename", "content_type", "size", "stored", "status", "failure_reason",
              "text_length", "truncated", "text_preview", "created_at", "updated_at"]
    readonly_fields = ["id", "user", "content_type", "size", "stored", "status", "failure_reason",
                       "text_length", "truncated", "text_preview", "created_at", "updated_at"]
    actions = ["requeue_extraction"]

    def has_add_permission(self, request):
        return False  # uploads come through the API

    def get_queryset(self, request):
        return super().get_queryset(request).defer("text")

    @admin.display(description="size", ordering="size")
    def human_size(self, obj: UploadedFile) -> str:
        return filesizeformat(obj.size)

    @admin.display(description="extracted text (start)")
    def text_preview(self, obj: UploadedFile) -> str:
        head = (UploadedFile.objects.filter(pk=obj.pk).annotate(head=Substr("text", 1, PREVIEW_CHARS))
                .values_list("head", flat=True).first() or "")
        return head + (" …" if obj.text_length > PREVIEW_CHARS else "")

    def delete_queryset(self, request, queryset):
        # One by one, so each row's stored bytes are removed too (files_app.signals).
        for row in queryset:
            services.delete_file(row)

    @admin.action(description="Queue text extraction again (pending files only)")
    def requeue_extraction(self, request, queryset):
        pending = list(queryset.filter(status=UploadedFile.Status.PENDING).values_list("id", flat=True))
        for file_id in pending:
            services.enqueue_extraction(file_id)
        self.message_user(request, f"Queued extraction of {len(pending)} pending file(s).", messages.INFO)
