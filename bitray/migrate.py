"""``bitray outputs migrate ROOT``: give version ``v0`` a path of its own.

An output made before collections is version ``v0`` with its data at ROOT itself (``bitray.collection``).
That reads fine while v0 is current, but once another version is, v0's files sit at ROOT beside
``versions/`` and ``_bitray``, and no path reads v0 alone (readers of ROOT follow the pointer). The
migration moves them under ``ROOT/versions/v0/``, like any version's, in an order that loses nothing and
never shows a reader two copies:

1. **Lock.** It takes ROOT's run lock, the one ``bitray embed`` takes (``bitray.locks``): a run in progress
   refuses the migration, naming it, and no run starts at ROOT while it moves. An unfinished run (killed,
   to be resumed) refuses it too: its commit log names ROOT's files.
2. **Copy** every object of v0's parts (``ROOT_PARTS`` but the index) to the same name under
   ``versions/v0/`` (a server-side copy on S3), into a cleared target; then **verify**: the same names with
   the same sizes, else nothing goes further.
3. **Index** v0's copy there when ROOT had an index (an index records its output's path, so it is built
   again, not copied): search finds one the moment readers move.
4. **Switch** readers with one conditional write: v0's record goes from ``data: "."`` to
   ``data: "versions/v0"`` only if it still says ``"."``. Before it, everyone reads ROOT's files; after it,
   the copy.
5. **Delete** the originals at ROOT.

Killed anywhere, it is run again: before (4) the copy is redone from scratch; after it only (5) is left,
and a run of ``migrate`` finishes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitray import storage
from bitray.collection import ROOT_PARTS, ROOT_VERSION, Collection
from bitray.config import StorageConfig
from bitray.errors import BitrayError

TARGET = f"versions/{ROOT_VERSION}"
COPIED = tuple(part for part in ROOT_PARTS if part != "_index")
LOCK_TTL_S = 120.0
"""The lease's TTL on object stores, as ``bitray embed``'s default ``lock_ttl_s``."""


@dataclass(frozen=True)
class Migration:
    data: str
    """v0's data path now."""
    objects: int
    """Objects copied (0 when only the deletion of an earlier migration was left)."""
    index: str | None


def migrate(root: str, storage_config: StorageConfig | None = None) -> Migration:
    """Move v0's data from ROOT to ``ROOT/versions/v0`` (see the module's docstring); idempotent."""
    from bitray.embed.layout import output_layout
    from bitray.embed.state import IncrementalState
    from bitray.locks import LockHeld, open_lock

    collection = Collection(root, storage_config)
    config = storage_config or StorageConfig()
    record = collection.record(ROOT_VERSION) if _has_v0(collection) else None
    if record is None:
        raise BitrayError(
            f"{collection.root} has no version {ROOT_VERSION} (no output made before collections); "
            "nothing to migrate"
        )
    layout = output_layout(_embed_config(collection.root, config))
    try:
        with open_lock(layout.lock_uri, "migrate", storage=config, ttl_s=LOCK_TTL_S):
            record = collection.record(ROOT_VERSION)
            objects = index = None
            if record.data == ".":
                finished = set(IncrementalState.load(layout).finished)
                unfinished = sorted(set(layout.run_ids()) - finished)
                if unfinished:
                    raise BitrayError(
                        f"{collection.root} has an unfinished run ({', '.join(unfinished)}); resume it "
                        f"(bitray embed --output {collection.root} ...) and migrate when it has finished"
                    )
                objects = _copy(collection, config)
                index = _index(collection, config)
                collection.update(ROOT_VERSION, expect_data=".", data=TARGET)
            for part in ROOT_PARTS:
                storage.delete_tree(storage.join(collection.root, part), config)
    except LockHeld as exc:
        raise BitrayError(f"{exc.args[0]}; migrate {collection.root} when it has finished") from None
    return Migration(storage.join(collection.root, TARGET), objects or 0, index)


def _has_v0(collection: Collection) -> bool:
    return any(version.name == ROOT_VERSION for version in collection.versions())


def _embed_config(output: str, config: StorageConfig):  # noqa: ANN202 - an EmbedConfig
    from bitray.config import EmbedConfig

    return EmbedConfig(output=output, storage=config)


def _copy(collection: Collection, config: StorageConfig) -> int:
    """Copy v0's parts under the cleared target and verify names and sizes; the number of objects."""
    target = storage.join(collection.root, TARGET)
    storage.delete_tree(target, config)  # an interrupted copy's leftovers
    fs, _ = storage.filesystem_for(collection.root, config)
    source: dict[str, int] = {}
    for part in COPIED:
        for obj in _listing(storage.join(collection.root, part), config):
            relative = obj.uri[len(collection.root) + 1 :]
            source[relative] = obj.size
            destination = storage.join(target, relative)
            if not storage.is_remote(destination):
                storage.local_path(destination).parent.mkdir(parents=True, exist_ok=True)
            fs.copy_file(_fs_path(obj.uri, config), _fs_path(destination, config))
    copied = {
        obj.uri[len(target) + 1 :]: obj.size
        for part in COPIED
        for obj in _listing(storage.join(target, part), config)
    }
    if copied != source:
        missing = sorted(set(source) - set(copied)) or sorted(k for k in source if source[k] != copied.get(k))
        raise BitrayError(
            f"the copy of {collection.root}'s v0 under {target} does not match ({len(copied)} of "
            f"{len(source)} objects; first difference {missing[:1]}); nothing was switched: run the "
            "migration again"
        )
    return len(source)


def _listing(uri: str, config: StorageConfig) -> list:
    if not storage.exists(uri, config):
        return []
    return list(storage.list_objects(uri, storage=config))


def _fs_path(uri: str, config: StorageConfig) -> str:
    return storage.filesystem_for(uri, config)[1]


def _index(collection: Collection, config: StorageConfig) -> str | None:
    """v0's index, built again on the copy when ROOT had one."""
    from bitray.search.index import META_FILE, default_index_uri, update_index

    if not storage.exists(storage.join(default_index_uri(collection.root), META_FILE), config):
        return None
    target = storage.join(collection.root, TARGET)
    update_index(target, storage_config=config)
    return default_index_uri(target)
