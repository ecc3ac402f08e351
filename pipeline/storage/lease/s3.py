"""The lease on S3 (s3fs), by conditional requests.

Create is a PUT with `If-None-Match: *`; swap (takeover, renewal) a PUT with `If-Match: <ETag
the caller read or last wrote>`; delete a DELETE with `If-Match`. Of several concurrent creators
or takers exactly one PUT succeeds, the others get 412 (or 409 ConditionalRequestConflict on AWS)
and re-read. AWS S3 has honoured these headers since 2024 (conditional DELETE since late 2024);
moto's server honours all three. A server that ignores them would overwrite silently: RunLease
reads the object back after every create or takeover and it must hold its token, which catches
most of that (not an interleaving of two read-backs).

A version of the lease is its ETag.
"""

from __future__ import annotations

from typing import Any

import fsspec.asyn

from pipeline.storage.atomic import lost_race
from pipeline.storage.lease.record import LEASE, decode


class S3Backend:
    def __init__(self, fs: Any, root: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(f"{root}/{LEASE}")
        self.where = f"s3://{self.bucket}/{self.key}"

    def read(self) -> tuple[dict[str, Any], str] | None:
        async def get() -> tuple[bytes, str]:
            # Body and ETag from one GET, so the version always belongs to the bytes.
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            data, etag = fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        return decode(data), etag

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def swap(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> bool:
        try:
            self._call("delete_object", IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as e:
            if lost_race(e):
                return False
            raise
        return True

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            return self._call("put_object", Body=data, **condition)["ETag"]
        except FileExistsError:  # s3fs's name for a failed If-None-Match
            return None
        except FileNotFoundError:  # If-Match on an object deleted meanwhile
            return None
        except OSError as e:
            if lost_race(e):
                return None
            raise
