"""One view of object storage: URIs (``s3://``, ``gs://``, local paths) -> pyarrow filesystems.

Reading and writing go through pyarrow. Listing S3 goes through boto3's paginator instead, because it
streams pages of 1,000 keys and returns each object's ETag, which pyarrow's ``FileInfo`` lacks; both read
credentials from the standard AWS chain, and neither ever prints them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from bitray.config import StorageConfig
from bitray.errors import BitrayError

REMOTE_SCHEMES = ("s3", "gs", "gcs")


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: where it is and which version of it was seen."""

    uri: str
    size: int
    mtime_ns: int | None = None
    etag: str | None = None

    @property
    def version(self) -> str:
        """A string that changes whenever the object's content may have changed."""
        if self.etag:
            return f"etag:{self.etag}"
        return f"size:{self.size}:mtime_ns:{self.mtime_ns}"


def scheme_of(uri: str) -> str:
    """``s3``, ``gs`` or ``file``."""
    scheme = urlparse(uri).scheme.lower()
    if scheme == "gcs":
        return "gs"
    if scheme in ("s3", "gs"):
        return scheme
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        return "file"
    raise BitrayError(f"{uri!r}: unsupported storage scheme {scheme!r}; use s3://, gs:// or a local path")


def is_remote(uri: str) -> bool:
    return scheme_of(uri) != "file"


def local_path(uri: str) -> Path:
    """The absolute local path of a ``file://`` URI or plain path."""
    parsed = urlparse(uri)
    raw = parsed.path if parsed.scheme == "file" else uri
    return Path(raw).expanduser().absolute()


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with ``/``."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def split_bucket(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise BitrayError(f"{uri!r} names no bucket; write it as {parsed.scheme}://BUCKET/PREFIX")
    return parsed.netloc, parsed.path.lstrip("/")


def filesystem_for(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path to use with it (``bucket/key`` or a local path)."""
    storage = storage or StorageConfig()
    scheme = scheme_of(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), str(local_path(uri))
    bucket, key = split_bucket(uri)
    path = f"{bucket}/{key}".rstrip("/")
    if scheme == "s3":
        return s3_filesystem(storage), path
    return pafs.GcsFileSystem(anonymous=storage.anonymous), path


CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    """A shared S3 filesystem per endpoint, region and credential environment.

    Creating one costs tens of milliseconds, far more than reading a small image, so per-object reads
    reuse it. The key includes a digest of the credential variables, so changed credentials get a new one.
    """
    environment = "\0".join(os.environ.get(k, "") for k in CREDENTIAL_ENV)
    credentials = hashlib.sha256(environment.encode()).hexdigest()
    return _s3_filesystem(
        storage.resolved_s3_endpoint(), storage.resolved_s3_region(), storage.anonymous, credentials
    )


@functools.lru_cache(maxsize=32)
def _s3_filesystem(
    endpoint: str | None, region: str, anonymous: bool, _credentials: str
) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": region,
        "anonymous": anonymous,
        "connect_timeout": 5,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc + parsed.path if parsed.scheme else endpoint
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def s3_client(storage: StorageConfig | None = None):  # noqa: ANN201 - boto3 clients are untyped
    """A boto3 S3 client using the same endpoint and region as ``s3_filesystem``."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    storage = storage or StorageConfig()
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        signature_version=UNSIGNED if storage.anonymous else None,
    )
    return boto3.client(
        "s3",
        endpoint_url=storage.resolved_s3_endpoint(),
        region_name=storage.resolved_s3_region(),
        config=config,
    )


def matches(name: str, extensions: Iterable[str] | None) -> bool:
    if extensions is None:
        return True
    lower = name.lower()
    return any(
        lower.endswith(ext.lower() if ext.startswith(".") else f".{ext.lower()}") for ext in extensions
    )


def list_objects(
    uri: str,
    *,
    extensions: Iterable[str] | None = None,
    storage: StorageConfig | None = None,
) -> Iterator[ObjectInfo]:
    """Stream every object under ``uri`` (a prefix or a single object), without reading any bytes.

    Directory markers (keys ending in ``/``) are not objects and are never yielded. Raises
    ``BitrayError`` for a missing bucket or path, refused credentials or an unreachable endpoint.
    """
    exts = tuple(extensions) if extensions is not None else None
    scheme = scheme_of(uri)
    if scheme == "s3":
        yield from _list_s3(uri, exts, storage or StorageConfig())
    elif scheme == "file":
        yield from _list_local(uri, exts)
    else:
        yield from _list_pyarrow(uri, exts, storage or StorageConfig())


def _list_local(uri: str, exts: tuple[str, ...] | None) -> Iterator[ObjectInfo]:
    root = local_path(uri)
    if root.is_file():
        st = root.stat()
        yield ObjectInfo(str(root), st.st_size, st.st_mtime_ns)
        return
    if not root.is_dir():
        raise BitrayError(f"input {uri!r} does not exist; check the path")
    yield from _walk_sorted(root, exts)


def _walk_sorted(directory: Path, exts: tuple[str, ...] | None) -> Iterator[ObjectInfo]:
    """Depth-first in the code-point order of full paths (S3's key order): a directory sorts as ``name/``."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name + "/" if e.is_dir() else e.name)
    except OSError:
        return  # removed or unreadable while listing
    for entry in entries:
        if entry.is_dir(follow_symlinks=True):
            yield from _walk_sorted(Path(entry.path), exts)
        elif matches(entry.name, exts):
            try:
                st = entry.stat()
            except OSError:
                continue  # removed while listing: not an input of this run
            yield ObjectInfo(entry.path, st.st_size, st.st_mtime_ns)


def _list_s3(uri: str, exts: tuple[str, ...] | None, storage: StorageConfig) -> Iterator[ObjectInfo]:
    bucket, prefix = split_bucket(uri)
    client = s3_client(storage)
    paginator = client.get_paginator("list_objects_v2")
    with s3_errors(uri, storage):
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/") or not matches(key, exts):
                    continue
                if prefix and key != prefix and not prefix.endswith("/") and not key.startswith(prefix + "/"):
                    continue  # prefix "a/b" must not match "a/bc/x.jpg"
                yield ObjectInfo(
                    uri=f"s3://{bucket}/{key}",
                    size=int(obj["Size"]),
                    mtime_ns=int(obj["LastModified"].timestamp() * 1e9),
                    etag=str(obj.get("ETag", "")).strip('"') or None,
                )


def _list_pyarrow(uri: str, exts: tuple[str, ...] | None, storage: StorageConfig) -> Iterator[ObjectInfo]:
    fs, path = filesystem_for(uri, storage)
    scheme = scheme_of(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            infos = [info]
        elif info.type == pafs.FileType.NotFound:
            raise BitrayError(f"input {uri!r} does not exist; check the bucket and prefix")
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise BitrayError(f"cannot list {uri!r}: {exc}") from None
    for item in sorted(infos, key=lambda i: i.path):
        if item.type != pafs.FileType.File or not matches(item.base_name, exts):
            continue
        mtime = item.mtime_ns if item.mtime_ns is not None else None
        yield ObjectInfo(f"{scheme}://{item.path}", int(item.size or 0), mtime)


class s3_errors:  # noqa: N801 - used as a context manager, reads like a function
    """Turn boto3 errors about the bucket, credentials or endpoint into one clear ``BitrayError``."""

    def __init__(self, uri: str, storage: StorageConfig) -> None:
        self.uri = uri
        self.storage = storage

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:  # noqa: ANN001
        if exc is None:
            return False
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        endpoint = self.storage.resolved_s3_endpoint() or "AWS S3"
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "404"):
                bucket, _ = split_bucket(self.uri)
                raise BitrayError(f"bucket {bucket!r} of {self.uri!r} does not exist at {endpoint}") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
                raise BitrayError(
                    f"access to {self.uri!r} was refused ({code}); check the AWS credentials "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role)"
                ) from None
            raise BitrayError(f"S3 error on {self.uri!r}: {code}: {exc}") from None
        if isinstance(exc, EndpointConnectionError | ReadTimeoutError):
            raise BitrayError(
                f"cannot reach the S3 endpoint {endpoint} for {self.uri!r}; check storage.s3_endpoint "
                "or AWS_ENDPOINT_URL_S3 and the network"
            ) from None
        if isinstance(exc, NoCredentialsError):
            raise BitrayError(
                f"no AWS credentials found for {self.uri!r}; set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, or storage.anonymous: true for a public bucket"
            ) from None
        return False


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = filesystem_for(uri, storage)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise BitrayError(f"{uri!r} does not exist") from None
    except OSError as exc:
        raise BitrayError(f"cannot read {uri!r}: {exc}") from None


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write a whole object. Local files are written to a temporary name and renamed, so readers never
    see a partial file; object stores make a single PUT visible atomically by themselves."""
    fs, path = filesystem_for(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    try:
        with fs.open_output_stream(path) as out:
            out.write(data)
    except OSError as exc:
        raise BitrayError(f"cannot write {uri!r}: {exc}") from None


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = filesystem_for(uri, storage)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise BitrayError(f"cannot reach {uri!r}: {exc}") from None


def default_cache_dir() -> Path:
    return Path(os.environ.get("BITRAY_CACHE_DIR", Path.home() / ".cache" / "bitray"))


def copy_to_local(uri: str, storage: StorageConfig | None = None, cache_dir: Path | None = None) -> Path:
    """A local copy of a remote file or directory (e.g. a SavedModel), cached by URI.

    Local inputs are returned as they are. The copy is made under a temporary name and renamed when
    complete, so an interrupted download is never mistaken for a cached one.
    """
    if not is_remote(uri):
        path = local_path(uri)
        if not path.exists():
            raise BitrayError(f"{uri!r} does not exist; check the path")
        return path
    fs, src = filesystem_for(uri, storage)
    try:
        info = fs.get_file_info(src)
    except OSError as exc:
        raise BitrayError(f"cannot reach {uri!r}: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise BitrayError(f"{uri!r} does not exist; check the bucket and key")
    cache = (cache_dir or default_cache_dir()) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache / Path(src).name
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
    try:
        # copy_files copies a single file or a whole directory tree alike
        pafs.copy_files(
            src,
            str(staging / target.name),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        os.replace(staging / target.name, target)
    except OSError as exc:
        raise BitrayError(f"cannot copy {uri!r} to {cache}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def delete(uri: str, storage: StorageConfig | None = None) -> None:
    """Remove one file or object; a missing one is not an error."""
    fs, path = filesystem_for(uri, storage)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise BitrayError(f"cannot delete {uri!r}: {exc}") from None


def list_names(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """The sorted names directly under a directory or prefix; empty when it does not exist."""
    fs, path = filesystem_for(uri, storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as exc:
        raise BitrayError(f"cannot list {uri!r}: {exc}") from None
    return sorted(info.base_name for info in infos)


# -- S3 multipart uploads: how the embedding pipeline stages and commits its output files -----------------
#
# An upload that is not completed is invisible to every reader (LIST and GET alike), and completing it
# makes the whole object appear at once. Writers upload parts; a single committer completes or aborts.


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload of one object whose parts are uploaded but which is not completed yet."""

    uri: str
    upload_id: str
    parts: tuple[tuple[int, str], ...]  # (part number, ETag)


MULTIPART_PART_BYTES = 64 * 2**20


def upload_parts(uri: str, data: bytes, storage: StorageConfig) -> PendingUpload:
    """Start a multipart upload of ``data`` to ``uri`` and upload its parts, without completing it."""
    client = s3_client(storage)
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


def complete_upload(upload: PendingUpload, storage: StorageConfig) -> bool:
    """Complete ``upload``: its object appears whole. Idempotent: True when the object exists afterwards,
    False when the upload is gone and the object does not exist (aborted, or expired by a lifecycle rule)."""
    from botocore.exceptions import ClientError

    client = s3_client(storage)
    bucket, key = split_bucket(upload.uri)
    parts = [{"PartNumber": number, "ETag": etag} for number, etag in upload.parts]
    with s3_errors(upload.uri, storage):
        try:
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload.upload_id, MultipartUpload={"Parts": parts}
            )
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") not in ("NoSuchUpload", "404"):
                raise
        return exists(upload.uri, storage)  # completed by an earlier attempt, or gone


def abort_upload(uri: str, upload_id: str, storage: StorageConfig) -> None:
    """Abort a multipart upload; an upload that is already gone is not an error."""
    from botocore.exceptions import ClientError

    client = s3_client(storage)
    bucket, key = split_bucket(uri)
    with s3_errors(uri, storage):
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") not in ("NoSuchUpload", "404"):
                raise


def pending_uploads(prefix_uri: str, storage: StorageConfig) -> Iterator[tuple[str, str]]:
    """(object URI, upload id) of each multipart upload in progress under ``prefix_uri``, paged."""
    client = s3_client(storage)
    bucket, prefix = split_bucket(prefix_uri)
    with s3_errors(prefix_uri, storage):
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                yield f"s3://{bucket}/{upload['Key']}", upload["UploadId"]


def move_file(src: str, dst: str, storage: StorageConfig | None = None) -> bool:
    """Make ``src`` appear whole as ``dst``: a rename locally, a server-side copy then a delete elsewhere.

    Idempotent: True when ``dst`` exists afterwards, False when neither exists (nothing to move).
    """
    fs, src_path = filesystem_for(src, storage)
    _, dst_path = filesystem_for(dst, storage)
    try:
        if fs.get_file_info(src_path).type == pafs.FileType.NotFound:
            return fs.get_file_info(dst_path).type != pafs.FileType.NotFound
        if isinstance(fs, pafs.LocalFileSystem):
            Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src_path, dst_path)  # atomic on one filesystem
        else:
            fs.copy_file(src_path, dst_path)  # a server-side copy: the object appears whole
            fs.delete_file(src_path)
    except OSError as exc:
        raise BitrayError(f"cannot move {src!r} to {dst!r}: {exc}") from None
    return True


def delete_tree(uri: str, storage: StorageConfig | None = None) -> None:
    """Remove a directory or prefix and everything under it (batched deletes on object stores)."""
    fs, path = filesystem_for(uri, storage)
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BitrayError(f"cannot delete {uri!r}: {exc}") from None
