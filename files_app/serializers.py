from rest_framework import serializers

from files_app.models import UploadedFile


class FileSerializer(serializers.ModelSerializer):
    error = serializers.CharField(source="failure_reason", read_only=True,
                                  help_text="Why the extraction failed (status `failed`); empty otherwise.")

    class Meta:
        model = UploadedFile
        fields = ["id", "filename", "size", "content_type", "status", "error", "truncated", "created_at"]
        read_only_fields = fields
