"""Job directories on any fsspec filesystem: a local path, or a URL such as s3://, gs://, memory://.

Commits are atomic: a file is written under a temporary name and renamed into place (on object
stores, where an upload is already all-or-nothing, the rename is a copy of a complete object).
"""

from __future__ import annotations

import io
import json
import os
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


class Store:
    def __init__(self, root: str):
        self.fs, path = fsspec.core.url_to_fs(root)
        self.root = path.rstrip("/")
        self.url = root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri(self, rel: str) -> str:
        """The path as DuckDB (with this filesystem registered) or any fsspec user addresses it."""
        if self.local:
            return self.path(rel)
        proto = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{proto}://{self.path(rel).lstrip('/')}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def makedirs(self, rel: str = ""):
        self.fs.makedirs(self.path(rel) if rel else self.root, exist_ok=True)

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching pattern, sorted."""
        prefix = self.root + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p
                      for p in self.fs.glob(self.path(pattern)))

    def write_bytes(self, rel: str, data: bytes):
        target = self.path(rel)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
            if self.local:
                f.flush()
                os.fsync(f.fileno())
        self.fs.mv(tmp, target)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def write_json(self, rel: str, obj):
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def write_table(self, rel: str, table: pa.Table):
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str) -> pa.Table:
        with self.fs.open(self.path(rel), "rb") as f:
            return pq.read_table(f)

    def remove(self, rel: str):
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)
