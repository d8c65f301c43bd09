from rest_framework import serializers

from files_app.models import UploadedFile


class FileSerializer(serializers.ModelSerializer):
    class Meta:
        model = UploadedFile
        fields = ["id", "filename", "size", "content_type", "status", "created_at"]
