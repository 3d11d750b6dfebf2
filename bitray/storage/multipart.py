"""S3 multipart uploads: how the embedding pipeline stages and commits its output files.

An upload that is not completed is invisible to every reader (LIST and GET alike), and completing it
makes the whole object appear at once. Writers upload parts; a single committer completes or aborts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from bitray.config import StorageConfig
from bitray.storage.clients import shared_s3_client
from bitray.storage.deadline import s3_request
from bitray.storage.errors import error_code, s3_errors
from bitray.storage.objects import exists
from bitray.storage.uri import split_bucket


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload of one object whose parts are uploaded but which is not completed yet."""

    uri: str
    upload_id: str
    parts: tuple[tuple[int, str], ...]  # (part number, ETag)


MULTIPART_PART_BYTES = 64 * 2**20


def upload_parts(uri: str, data: bytes, storage: StorageConfig) -> PendingUpload:
    """Start a multipart upload of ``data`` to ``uri`` and upload its parts, without completing it."""
    client = shared_s3_client(storage)
    bucket, key = split_bucket(uri)
    with s3_errors(uri, storage):
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        parts = []
        view = memoryview(data)
        for number, start in enumerate(range(0, max(len(data), 1), MULTIPART_PART_BYTES), start=1):
            chunk = view[start : start + MULTIPART_PART_BYTES]
            etag = client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=bytes(chunk)
            )["ETag"]
            parts.append((number, etag))
    return PendingUpload(uri, upload_id, tuple(parts))


def complete_upload(upload: PendingUpload, storage: StorageConfig, *, deadline: float | None = None) -> bool:
    """Complete ``upload``: its object appears whole. Idempotent: True when the object exists afterwards,
    False when the upload is gone and the object does not exist (aborted, or expired by a lifecycle rule).
    ``deadline``: each request ends by it (``bitray.storage.deadline``)."""
    from botocore.exceptions import ClientError

    bucket, key = split_bucket(upload.uri)
    parts = [{"PartNumber": number, "ETag": etag} for number, etag in upload.parts]
    with s3_errors(upload.uri, storage):
        try:
            s3_request(
                storage,
                deadline,
                lambda client: client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload.upload_id, MultipartUpload={"Parts": parts}
                ),
                f"completing the upload of {upload.uri}",
            )
            return True
        except ClientError as exc:
            if error_code(exc) not in ("NoSuchUpload", "404"):
                raise
        return exists(upload.uri, storage, deadline=deadline)  # completed by an earlier attempt, or gone


def abort_upload(uri: str, upload_id: str, storage: StorageConfig, *, deadline: float | None = None) -> None:
    """Abort a multipart upload; an upload that is already gone is not an error."""
    from botocore.exceptions import ClientError

    bucket, key = split_bucket(uri)
    with s3_errors(uri, storage):
        try:
            s3_request(
                storage,
                deadline,
                lambda client: client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id),
                f"aborting the upload of {uri}",
            )
        except ClientError as exc:
            if error_code(exc) not in ("NoSuchUpload", "404"):
                raise


def pending_uploads(
    prefix_uri: str, storage: StorageConfig, *, deadline: float | None = None
) -> Iterator[tuple[str, str]]:
    """(object URI, upload id) of each multipart upload in progress under ``prefix_uri``, paged."""
    bucket, prefix = split_bucket(prefix_uri)
    page_args: dict = {"Bucket": bucket, "Prefix": prefix}
    with s3_errors(prefix_uri, storage):
        while True:
            page = s3_request(
                storage,
                deadline,
                lambda client: client.list_multipart_uploads(**page_args),
                f"LIST {prefix_uri}",
            )
            for upload in page.get("Uploads", []):
                yield f"s3://{bucket}/{upload['Key']}", upload["UploadId"]
            if not page.get("IsTruncated"):
                return
            page_args.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
