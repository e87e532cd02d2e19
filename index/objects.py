"""Objects written only if they are still the version read: the run lease of a table
and the CURRENT pointer of an index on an object store.

On s3:// through boto3, with `If-None-Match: *` (create) and `If-Match: <ETag>` (replace)
puts: of two writers racing, exactly one wins. Other stores are reached through pyarrow,
which has no conditional put: there a write checks the version first and reads itself
back SETTLE_S later (best effort; `atomic` is False). The S3 endpoint and credentials come
from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as for
pyarrow's S3FileSystem.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

SETTLE_S = 0.5  # best effort: wait this long before reading our write back


class Conflict(Exception):
    """A conditional write of the object failed: it changed since it was read (HTTP 412)."""


@dataclass(frozen=True)
class ObjectVersion:
    data: bytes
    tag: str  # what a conditional write of the next version must name (an S3 ETag)


class ConditionalObject:
    """An object that is read with a version tag and written only against one."""

    uri: str
    atomic: bool  # True when create/replace are real conditional writes

    def read(self) -> ObjectVersion | None:
        raise NotImplementedError

    def create(self, data: bytes) -> str:
        """Write DATA if no object exists; its new tag, or Conflict."""
        raise NotImplementedError

    def replace(self, data: bytes, tag: str) -> str:
        """Write DATA if the object is still the version TAG; its new tag, or Conflict."""
        raise NotImplementedError


class S3Object(ConditionalObject):
    """s3://BUCKET/KEY through boto3, with `If-None-Match: *` / `If-Match: ETag` puts."""

    atomic = True

    def __init__(self, bucket: str, key: str, client=None):
        self.bucket, self.key, self.uri = bucket, key, f"s3://{bucket}/{key}"
        self.client = client if client is not None else _s3_client(
            tuple(os.environ.get(k) for k in _AWS_ENV))

    def read(self) -> ObjectVersion | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
            return ObjectVersion(got["Body"].read(), got["ETag"])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise OSError(f"cannot read the object {self.uri}: {e}") from e
        except BotoCoreError as e:
            raise OSError(f"cannot read the object {self.uri}: {e}") from e

    def create(self, data: bytes) -> str:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, tag: str) -> str:
        return self._put(data, IfMatch=tag)

    def _put(self, data: bytes, **condition: str) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                          **condition)["ETag"]
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = e.response.get("Error", {}).get("Code")
            # 412: the condition failed; 409: a concurrent conditional write of the same key;
            # 404: If-Match on an object deleted meanwhile.
            if status in (404, 409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict",
                                                     "NoSuchKey"):
                now = self.read()
                if now is not None and now.data == data:  # a retry of our own write that had landed
                    return now.tag
                raise Conflict(f"{self.uri}: {code or status}") from e
            raise OSError(f"cannot write the object {self.uri}: {e}") from e
        except BotoCoreError as e:
            raise OSError(f"cannot write the object {self.uri}: {e}") from e


# What boto3 reads from the environment to reach S3 (pyarrow's S3FileSystem reads the same).
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION")


@functools.lru_cache(maxsize=4)
def _s3_client(env: tuple[str | None, ...]):
    """A boto3 S3 client for the AWS_* environment ENV (the cache key; clients are thread
    safe and take ~0.1 s to make). AWS_REGION counts when nothing else sets a region."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    region = session.region_name or dict(zip(_AWS_ENV, env, strict=True))["AWS_REGION"]
    return session.client("s3", region_name=region,
                          config=Config(connect_timeout=10, read_timeout=30,
                                        retries={"mode": "standard", "max_attempts": 3}))


class FsObject(ConditionalObject):
    """A object file on a pyarrow filesystem without conditional writes: best effort.

    A write checks the current version first and reads itself back SETTLE_S later; two
    writers closer together than that can both believe they won.
    """

    atomic = False

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str, *, settle_s: float = SETTLE_S):
        self.fs, self.path, self.uri, self.settle_s = fs, path, uri, settle_s

    def read(self) -> ObjectVersion | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return ObjectVersion(data, hashlib.sha256(data).hexdigest())

    def create(self, data: bytes) -> str:
        if self.read() is not None:
            raise Conflict(f"{self.uri} exists")
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        return self._write(data)

    def replace(self, data: bytes, tag: str) -> str:
        now = self.read()
        if now is None or now.tag != tag:
            raise Conflict(f"{self.uri} changed")
        return self._write(data)

    def _write(self, data: bytes) -> str:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)
        time.sleep(self.settle_s)
        now = self.read()
        if now is None or now.data != data:
            raise Conflict(f"{self.uri} was overwritten")
        return now.tag


def object_at(uri: str) -> ConditionalObject:
    """The conditional object at URI (s3:// by boto3, other filesystems best effort)."""
    scheme, _, rest = uri.partition("://")
    if scheme.lower() == "s3":
        bucket, _, key = rest.partition("/")
        return S3Object(bucket, key)
    fs, path = pafs.FileSystem.from_uri(uri)
    return FsObject(fs, path, uri)
