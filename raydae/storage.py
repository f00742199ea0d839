"""Run-folder I/O that works the same on a local disk, an NFS mount or `s3://` (through pyarrow.fs)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs


class RunFolder:
    """One run's folder: `<storage>/<name>`. Small files (config, markers, metrics) go through here."""

    def __init__(self, storage: str, name: str):
        self.is_local = "://" not in storage
        if self.is_local:
            storage = str(Path(storage).expanduser().resolve())
        self.storage = storage
        self.name = name
        self.uri = f"{storage.rstrip('/')}/{name}"
        self.fs, self.path = pafs.FileSystem.from_uri(self.uri if not self.is_local else os.path.abspath(self.uri))

    def child(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    @classmethod
    def from_path(cls, run_dir: str) -> RunFolder:
        """The run folder a user names on the command line (`runs/dae-kl4-s0`, `s3://bucket/runs/x`)."""
        storage, _, name = run_dir.rstrip("/").rpartition("/")
        return cls(storage or ".", name)

    def _inside(self, rel: str) -> str:
        """The filesystem path of `rel` inside this folder (the folder itself for "")."""
        return f"{self.path}/{rel}" if rel else self.path

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self._inside(rel)).type != pafs.FileType.NotFound

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self._inside(rel)) as f:
            return f.read().decode()

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._inside(rel)) as f:
            return f.read()

    def write_text(self, rel: str, text: str) -> None:
        """Write atomically where the filesystem allows (local: temp file + rename; S3 puts are atomic)."""
        self.write_bytes(rel, text.encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self._inside(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if self.is_local:
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            Path(tmp).write_bytes(data)
            os.replace(tmp, target)
        else:
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def read_json(self, rel: str) -> dict:
        return json.loads(self.read_text(rel))

    def write_json(self, rel: str, data: dict) -> None:
        self.write_text(rel, json.dumps(data, indent=2, default=_jsonable) + "\n")

    def delete(self, rel: str) -> None:
        info = self.fs.get_file_info(self._inside(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self._inside(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self._inside(rel))

    def make(self) -> None:
        self.fs.create_dir(self.path, recursive=True)


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)
