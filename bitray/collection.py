"""A collection: versions of one embedding output (one per model), one of them current.

::

    ROOT/_bitray/current                  {"version": NAME, "generation": N, "switched": ISO-8601}
    ROOT/_bitray/versions/<name>.json     a version's record (``VersionRecord``): model spec, model id,
                                          registry version, created, state, gate result and reason
    ROOT/versions/<name>/                 the version's data: an ordinary bitray output (runs, errors,
                                          incremental state, ``_index``), readable on its own
    ROOT/embeddings/, ROOT/_bitray/state/ an output made before collections: version ``v0``, data at ROOT

**One current version, switched by one conditional write.** ``_bitray/current`` is the only thing readers
consult; ``switch`` replaces it only if it still names the version (and generation) the switch was decided
on: ``If-Match`` on S3, a generation precondition on GCS, an exclusive ``flock`` around read, compare and
atomic rename locally (one host, as ``bitray.search.commit``). Of two concurrent switches one wins and the
other is told, so a reader sees the old version or the new one, never a mix.

**No migration.** An output without ``_bitray/current`` is a collection of one version, ``v0``, whose data
path is ROOT itself; the first ``add`` writes v0's record and the pointer (naming v0), so nothing moves.
A version's data under ``ROOT/versions/`` is outside ROOT's own ``embeddings/`` and ``errors/``, so readers
of v0's files never see another version's.

**States.** A record says ``backfilling`` (being embedded), ``complete`` (every input accounted for, may
become current), or ``retired`` (kept for a rollback until ``gc`` deletes it after a retention); which
version is *current* is the pointer's business alone, so the two cannot disagree. ``gate`` holds the last
quality gate's verdict (``bitray.promote``), which ``bitray outputs`` prints.

This module knows only storage: the data of a version is read through ``bitray.outputs``, which follows
``current_data`` for a collection root.
"""

from __future__ import annotations

import fcntl
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from bitray import storage
from bitray.config import EmbedConfig, StorageConfig
from bitray.errors import BitrayError

ROOT_VERSION = "v0"
"""The name of the version an output made before collections holds at ROOT itself."""
ROOT_PARTS = ("embeddings", "predictions", "errors", "_index", "_bitray/state", "_bitray/runs")
"""What of ROOT is v0's data (an output's files but its lock), until ``bitray outputs migrate`` moves it."""
State = Literal["backfilling", "complete", "retired"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class SwitchConflict(BitrayError):
    """The current version moved since the switch was decided."""


class GateResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    passed: bool
    reason: str
    at: str
    metrics: dict[str, float] = {}
    baseline: dict[str, float] = {}


class VersionRecord(BaseModel):
    """``ROOT/_bitray/versions/<name>.json``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    data: str
    """The version's data path relative to ROOT: ``versions/<name>``, or ``.`` for v0."""
    model: str | None = None
    """The model spec asked for, e.g. ``models:/bitray-pets@champion``."""
    resolved: str | None = None
    """What it resolved to when the version was made, e.g. ``models:/bitray-pets/3``."""
    model_id: str | None = None
    created: str
    state: State = "backfilling"
    retired: float | None = None
    """When it was retired (Unix time): ``gc`` counts its retention from here."""
    gate: GateResult | None = None
    job: str | None = None
    """The Ray job that embeds into it now or did last (a schedule's backfill, ``bitray.backfill``)."""
    caught_up: bool = False
    """The backfill finished and the catch-up pass (what arrived meanwhile) was submitted."""


class Pointer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    generation: int
    switched: str


@dataclass(frozen=True)
class Version:
    """A version as listed: its record, its data's URI, and whether it is the current one."""

    record: VersionRecord
    uri: str
    current: bool

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def state(self) -> str:
        return "current" if self.current else self.record.state


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise BitrayError(
            f"version name {name!r}: use letters, digits, '.', '_' and '-' (at most 100, first a letter or "
            "digit)"
        )
    return name


def name_for(resolved_model: str) -> str:
    """A version name for a model: ``models:/bitray-pets/3`` -> ``bitray-pets-3``, ``random:tiny`` ->
    ``random-tiny``."""
    text = resolved_model.removeprefix("models:/")
    return check_name(re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:100] or "model")


def current_data(root: str, storage_config: StorageConfig | None = None) -> str:
    """The data path readers of ``root`` use: the current version's for a collection, else ``root`` (one
    GET)."""
    return Collection(root, storage_config).current_uri()


def migrated_root(output: str, storage_config: StorageConfig | None = None) -> bool:
    """Whether ``output`` is a collection root whose v0 was moved under ``versions/`` (``bitray outputs
    migrate``): files written at ROOT itself would be no version's, so a run planned there before the
    migration must not write them (two GETs)."""
    collection = Collection(output, storage_config)
    if collection.pointer() is None:
        return False
    data = storage.read_if_exists(collection.record_uri(ROOT_VERSION), collection.storage)
    return data is not None and collection._parse(VersionRecord, data, output).data != "."


def following(config: EmbedConfig) -> EmbedConfig:
    """``config`` writing into the current version when its output is a collection root (read once, so a
    switch during a run cannot split the run across two versions)."""
    data = current_data(config.output, config.storage)
    return config if data == config.output.rstrip("/") else config.model_copy(update={"output": data})


class Collection:
    """The versions under one ROOT. Every method reads storage afresh: nothing is cached."""

    def __init__(self, root: str, storage_config: StorageConfig | None = None) -> None:
        root = root.rstrip("/")
        self.root = root if storage.is_remote(root) else str(storage.local_path(root))
        self.storage = storage_config or StorageConfig()

    # -- layout
    @property
    def pointer_uri(self) -> str:
        return storage.join(self.root, "_bitray", "current")

    def record_uri(self, name: str) -> str:
        return storage.join(self.root, "_bitray", "versions", f"{name}.json")

    def data_uri(self, record: VersionRecord) -> str:
        return self.root if record.data == "." else storage.join(self.root, record.data)

    # -- reads
    def pointer(self) -> Pointer | None:
        data = storage.read_if_exists(self.pointer_uri, self.storage)
        return None if data is None else self._parse(Pointer, data, self.pointer_uri)

    def current_uri(self) -> str:
        pointer = self.pointer()
        if pointer is None:
            return self.root
        return self.data_uri(self.record(pointer.version))

    def record(self, name: str) -> VersionRecord:
        data = storage.read_if_exists(self.record_uri(check_name(name)), self.storage)
        if data is None:
            if name == ROOT_VERSION and self.pointer() is None:
                return self._root_record()
            known = ", ".join(v.name for v in self.versions()) or "none"
            raise BitrayError(f"{self.root} has no version {name!r} (versions: {known})")
        return self._parse(VersionRecord, data, self.record_uri(name))

    def versions(self) -> list[Version]:
        """Every version, oldest first; v0 (ROOT's own data) first when ROOT holds an output."""
        pointer = self.pointer()
        directory = storage.join(self.root, "_bitray", "versions")
        names = [
            n[: -len(".json")] for n in storage.list_names(directory, self.storage) if n.endswith(".json")
        ]
        records = [self.record(name) for name in names]
        if pointer is None and self._root_holds_output():
            records.insert(0, self._root_record())
        records.sort(key=lambda r: (r.data != ".", r.created, r.name))
        current = pointer.version if pointer else ROOT_VERSION
        return [Version(r, self.data_uri(r), r.name == current) for r in records]

    def current(self) -> Version | None:
        return next((v for v in self.versions() if v.current), None)

    # -- writes
    def add(
        self, name: str, *, model: str | None = None, resolved: str | None = None, model_id: str | None = None
    ) -> Version:
        """A new version in state ``backfilling``; ``BitrayError`` when the name is taken (created once:
        of two concurrent adds of one name exactly one succeeds)."""
        check_name(name)
        if name == ROOT_VERSION:
            raise BitrayError(f"version name {name!r} is the name of ROOT's own data; choose another")
        self._adopt_root()
        record = VersionRecord(
            name=name,
            data=f"versions/{name}",
            model=model,
            resolved=resolved,
            model_id=model_id,
            created=now(),
        )
        if not storage.create_bytes(self.record_uri(name), _dump(record), self.storage):
            raise BitrayError(f"{self.root} already has a version {name!r}; choose another name")
        return Version(record, self.data_uri(record), False)

    def update(self, name: str, *, expect_data: str | None = None, **changes: Any) -> VersionRecord:
        """Rewrite fields of a version's record (its state, model id, gate result, data path) with one
        conditional write, so two updates never undo each other. ``expect_data``: only if its data path is
        still this (``SwitchConflict`` otherwise)."""
        self.record(name)  # v0's record is written (adopted) before it is changed; others must exist
        self._adopt_root()

        def change(held: VersionRecord | None) -> VersionRecord:
            if held is None:
                raise BitrayError(f"{self.root} has no version {name!r} any more (deleted meanwhile)")
            if expect_data is not None and held.data != expect_data:
                raise SwitchConflict(
                    f"{self.root}: version {name!r} holds its data at {held.data!r}, not {expect_data!r}"
                )
            return VersionRecord.model_validate({**held.model_dump(), **changes})

        return self._swap(change, self.record_uri(name), VersionRecord)

    def switch(self, name: str, *, expect: str | None = None) -> Pointer:
        """Make ``name`` current with one conditional write. ``expect``: the version the caller believes
        current (``SwitchConflict`` when another is); without it, whatever the pointer named when read."""
        record = self.record(name)
        if record.state == "backfilling":
            raise BitrayError(
                f"version {name!r} of {self.root} is still backfilling; wait until it is complete (or mark "
                "it complete by hand if it is)"
            )
        self._adopt_root()

        def move(held: Pointer | None) -> Pointer:
            current = held.version if held else None
            if expect is not None and current != expect:
                raise SwitchConflict(
                    f"{self.root}: the current version is {current or 'none'}, not {expect!r} as expected "
                    f"(another switch came first); nothing switched: check bitray outputs {self.root}"
                )
            return Pointer(version=name, generation=(held.generation if held else 0) + 1, switched=now())

        pointer = self._swap(move)
        if record.state == "retired":
            self.update(name, state="complete", retired=None)
        return pointer

    def retire(self, name: str) -> VersionRecord:
        """Mark a version retired (kept for a rollback; ``gc`` deletes it after the retention)."""
        current = self.current()
        if current is not None and current.name == name:
            raise BitrayError(
                f"version {name!r} is the current version of {self.root}; switch to another first"
            )
        self._adopt_root()
        return self.update(name, state="retired", retired=time.time())

    def gc(self, keep_s: float) -> list[str]:
        """Delete the data and record of versions retired more than ``keep_s`` seconds ago; their names."""
        deleted = []
        for version in self.versions():
            record = version.record
            if version.current or record.state != "retired" or record.retired is None:
                continue
            if time.time() - record.retired < keep_s:
                continue
            if record.data == ".":  # ROOT's own data: everything but the collection's files
                for part in ROOT_PARTS:
                    storage.delete_tree(storage.join(self.root, part), self.storage)
            else:
                storage.delete_tree(version.uri, self.storage)
            storage.delete(self.record_uri(record.name), self.storage)
            deleted.append(record.name)
        return deleted

    # -- internals
    def _root_holds_output(self) -> bool:
        return storage.exists(storage.join(self.root, "_bitray", "state", "current.json"), self.storage)

    def _root_record(self) -> VersionRecord:
        return VersionRecord(name=ROOT_VERSION, data=".", created="", state="complete")

    def _adopt_root(self) -> None:
        """Before the first change of a pre-collection output: v0's record, then the pointer naming it."""
        if self.pointer() is not None or not self._root_holds_output():
            return
        storage.create_bytes(self.record_uri(ROOT_VERSION), _dump(self._root_record()), self.storage)

        def adopt(held: Pointer | None) -> Pointer:
            return held or Pointer(version=ROOT_VERSION, generation=1, switched=now())

        self._swap(adopt)

    def _swap(self, move, uri: str | None = None, kind: type[BaseModel] = Pointer):  # noqa: ANN001, ANN202
        """Replace the pointer (or the ``kind`` object at ``uri``) with ``move(held)`` only if it is still
        ``held`` (compare-and-swap); the new one."""
        uri = uri or self.pointer_uri
        if storage.is_remote(uri):
            obj = storage.conditional_object(uri, self.storage, timeout_s=30.0)
            found = obj.read()
            held = None if found is None else self._parse(kind, found[0], uri)
            new = move(held)
            data = _dump(new)
            tag = obj.create(data) if found is None else obj.replace(data, found[1])
            if tag is None:
                raise SwitchConflict(
                    f"{uri} changed meanwhile (another switch or update came first); nothing changed: check "
                    f"bitray outputs {self.root} and try again"
                )
            return new
        path = storage.local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(Path(str(path) + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                held = self._parse(kind, path.read_bytes(), uri) if path.exists() else None
                new = move(held)
                storage.write_bytes(str(path), _dump(new))
                return new
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _parse(kind, data: bytes, uri: str):  # noqa: ANN001, ANN205
        try:
            return kind.model_validate_json(data)
        except ValidationError:
            raise BitrayError(
                f"{uri} is unreadable (edited by hand, or written by another bitray version); restore it"
            ) from None


def _dump(model: BaseModel) -> bytes:
    return json.dumps(model.model_dump(mode="json"), indent=1, sort_keys=True).encode()
