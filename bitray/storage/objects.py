"""Whole files and objects by URI: read, write, test, copy to local, delete, list names, move.

pyarrow refuses S3 keys with empty path components (``a//b``), so whole-object reads, writes, deletes and
existence checks on S3 go through boto3, which sends any key as it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.storage.clients import filesystem_for, shared_s3_client
from bitray.storage.conditional import get_with_etag
from bitray.storage.errors import error_code, s3_errors
from bitray.storage.uri import is_remote, local_path, scheme_of, split_bucket


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    """A whole object or file. S3 keys go through boto3, so any key is read as it is stored."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        with s3_errors(uri, storage):
            found = get_with_etag(uri, client=shared_s3_client(storage))
        if found is None:
            raise BitrayError(f"{uri!r} does not exist")
        return found[0]
    fs, path = filesystem_for(uri, storage)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise BitrayError(f"{uri!r} does not exist") from None
    except OSError as exc:
        raise BitrayError(f"cannot read {uri!r}: {exc}") from None


def read_if_exists(uri: str, storage: StorageConfig | None = None) -> bytes | None:
    """A whole object or file, or None when it does not exist: one request either way."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        with s3_errors(uri, storage):
            found = get_with_etag(uri, client=shared_s3_client(storage))
        return None if found is None else found[0]
    fs, path = filesystem_for(uri, storage)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BitrayError(f"cannot read {uri!r}: {exc}") from None


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write a whole object. Local files are written to a temporary name and renamed, so readers never
    see a partial file; object stores make a single PUT visible atomically by themselves. S3 keys go
    through boto3, so any key is written as given."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        bucket, key = split_bucket(uri)
        with s3_errors(uri, storage):
            shared_s3_client(storage).put_object(Bucket=bucket, Key=key, Body=data)
        return
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
    if scheme_of(uri) == "s3":
        from botocore.exceptions import ClientError

        storage = storage or StorageConfig()
        bucket, key = split_bucket(uri)
        with s3_errors(uri, storage):
            try:
                shared_s3_client(storage).head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return _s3_prefix_exists(uri, storage)
                raise
        return True
    fs, path = filesystem_for(uri, storage)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise BitrayError(f"cannot reach {uri!r}: {exc}") from None


def _s3_prefix_exists(uri: str, storage: StorageConfig) -> bool:
    """Whether ``uri`` is a "directory": some key starts with ``uri/`` (pyarrow's view, kept)."""
    bucket, key = split_bucket(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    page = shared_s3_client(storage).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return bool(page.get("KeyCount") or page.get("Contents"))


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
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        bucket, key = split_bucket(uri)
        with s3_errors(uri, storage):
            shared_s3_client(storage).delete_object(Bucket=bucket, Key=key)
        return
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
    """Remove a directory or prefix and everything under it (on S3: a LIST and a batched DELETE per
    1,000 keys; nothing else, so no directory markers appear)."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        client = shared_s3_client(storage)
        bucket, prefix = split_bucket(uri.rstrip("/") + "/")
        with s3_errors(uri, storage):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        return
    fs, path = filesystem_for(uri, storage)
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BitrayError(f"cannot delete {uri!r}: {exc}") from None
