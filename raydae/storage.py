"""Run-folder I/O that works the same on a local disk, an NFS mount or `s3://` (through pyarrow.fs)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable

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
        self.fs, self.path = filesystem(self.uri)

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


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a path or URI and the path inside it: every read and write here goes through it.
    A plain path may be relative (pyarrow wants it absolute)."""
    return pafs.FileSystem.from_uri(uri if is_uri(uri) else os.path.abspath(uri))


def is_uri(path: str) -> bool:
    """A storage URI (`s3://...`, `gs://...`, `file://...`) rather than a plain local path."""
    return "://" in str(path)


def download_tree(uri: str, local: str, keep: Callable[[str], bool]) -> int:
    """Copy the files under `uri` whose relative path passes `keep` into the local folder `local`."""
    fs, base = filesystem(uri.rstrip("/"))
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such folder")
    copied = 0
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        rel = info.path[len(base):].lstrip("/")
        if info.type != pafs.FileType.File or not keep(rel):
            continue
        target = Path(local, *rel.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as f:
            target.write_bytes(f.read())
        copied += 1
    return copied


def upload_files(local: str, rels: list[str], uri: str) -> None:
    """Copy the files `rels` (relative to the local folder `local`) to the same places under `uri`."""
    fs, base = filesystem(uri.rstrip("/"))
    for rel in rels:
        target = f"{base}/{rel}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(target) as f:
            f.write(Path(local, *rel.split("/")).read_bytes())


def delete_files(uri: str, under: str, keep: Callable[[str], bool]) -> None:
    """Delete the files in `uri`/`under` (not recursive) for which `keep(name)` is False."""
    fs, base = filesystem(uri.rstrip("/"))
    folder = f"{base}/{under}"
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(folder)):
        if info.type == pafs.FileType.File and not keep(info.base_name):
            fs.delete_file(info.path)


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)
