"""A restricted unpickler for EDM / SiD snapshots: reads records, never imports or executes anything.

EDM and SiD write networks with torch_utils.persistence: each network object is pickled as
    _reconstruct_persistent_obj({"type": "class", "version": 6, "module_src": <Python source>,
                                 "class_name": "VPPrecond", "state": <the module's __dict__>})
and the official loader exec()s `module_src` to rebuild the class: loading a stranger's snapshot runs
their code. Here `find_class` never imports a module and never returns a callable that can reach
one: every global resolves to one of a few safe stand-ins below, or to an inert placeholder class
that only records its name and arguments (so any other object in the file, e.g. dnnlib.EasyDict,
numpy scalars or the augment pipe, loads as a harmless record). Tensors are rebuilt from their raw
bytes (legacy storages through torch's own weights_only loader, zip archives from their data/
entries); nothing in the file is ever called.

The records keep enough (globals, arguments, state) for export.py to write the same structure back.
"""
from __future__ import annotations

import codecs
import collections
import io
import pickle

import torch

PERSISTENCE_GLOBAL = ("torch_utils.persistence", "_reconstruct_persistent_obj")

STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool, "UntypedStorage": torch.uint8}


class PersistentRecord:
    """A torch_utils.persistence object as stored: class name, embedded source (never run), state."""

    def __init__(self, meta):
        if not isinstance(meta, dict):
            raise pickle.UnpicklingError(f"persistent-object record is a {type(meta).__name__}, not a dict")
        self.meta = meta
        self.type = meta.get("type")
        self.class_name = meta.get("class_name")
        self.version = meta.get("version")
        self.module_src = meta.get("module_src")
        self.state = meta.get("state")

    def __repr__(self):
        return f"<persistent record {self.class_name!r} (type {self.type!r}, version {self.version})>"


class Inert(dict):
    """Base of the placeholder classes made for every global we do not know: an instance records
    how the pickle built it (called with args, or __new__ with args), its dict items and its state."""
    _global = ("", "")

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.how, obj.state, obj.items_list = args, "newobj", None, []
        return obj

    def __init__(self, *args, **kwargs):   # a REDUCE call (not NEWOBJ, which only runs __new__)
        super().__init__()
        self.how = "call"

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.items_list.append(item)

    def extend(self, items):
        self.items_list.extend(items)

    @classmethod
    def global_name(cls) -> str:
        return ".".join(cls._global)

    def __repr__(self):
        return f"<inert {self.global_name()} object>"

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


_PLACEHOLDERS: dict = {}


def placeholder(module: str, name: str) -> type:
    """The (cached) inert class standing for `module.name`; it has no behaviour of that global."""
    key = (module, name)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(f"Inert_{name}", (Inert,), {"_global": key, "__module__": __name__})
    return _PLACEHOLDERS[key]


class StorageKind:
    """torch.<X>Storage as named in a zip archive's persistent ids: only its element dtype is used."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


def _flat_tensor(storage) -> torch.Tensor:
    if isinstance(storage, torch.Tensor):
        return storage
    if isinstance(storage, torch.TypedStorage):
        return torch.empty(0, dtype=storage.dtype).set_(storage)
    raise pickle.UnpicklingError(f"a tensor's storage is a {type(storage).__name__}, not raw tensor data")


def rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                   metadata=None):
    """torch._utils._rebuild_tensor_v2, restated: a strided view of the flat storage (no hooks run)."""
    flat = _flat_tensor(storage)
    return torch.as_strided(flat, tuple(size), tuple(stride), int(storage_offset))


def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """torch._utils._rebuild_parameter(_with_state): the plain tensor (a snapshot's weights)."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter holds a {type(data).__name__}, not a tensor")
    return data


def rebuild_from_type(func, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2: only our own tensor rebuild may be the function."""
    if func not in (rebuild_tensor, rebuild_parameter):
        raise pickle.UnpicklingError("a tensor record names a rebuild function that is not torch's tensor rebuild")
    return func(*args)


def load_legacy_storage(data: bytes):
    """torch.storage._load_from_bytes: a storage in torch's legacy format, read with torch's own
    weights_only loader (which has no code-execution path)."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("a storage record does not hold bytes")
    return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)


def latin1_encode(text, encoding="latin1"):
    """_codecs.encode as protocol-2 pickles use it for bytes; other codecs refused."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def reconstructor(cls, base, state):
    """copyreg._reconstructor: an instance of the (placeholder or allowed) class, nothing run."""
    if isinstance(cls, type) and issubclass(cls, Inert):
        obj = cls.__new__(cls, base, state)
        obj.how = "reconstructor"
        return obj
    if cls in (collections.OrderedDict, dict):
        return cls()
    raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")


def _persistent(meta):
    return PersistentRecord(meta)


SAFE_GLOBALS = {
    PERSISTENCE_GLOBAL: _persistent,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "dict"): dict,
    ("builtins", "list"): list, ("builtins", "tuple"): tuple,
    ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): reconstructor, ("_codecs", "encode"): latin1_encode,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): rebuild_from_type,
    ("torch.storage", "_load_from_bytes"): load_legacy_storage,
}


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class only returns the stand-ins above or inert placeholders.

    `archive` (a zipfile.ZipFile and the record prefix) serves torch.save's persistent storage ids."""

    def __init__(self, file, archive=None):
        super().__init__(file)
        self.archive = archive
        self.globals_seen: list[str] = []

    def find_class(self, module, name):
        self.globals_seen.append(f"{module}.{name}")
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageKind(name)
        return placeholder(module, name)

    def persistent_load(self, pid):
        if self.archive is None:
            raise pickle.UnpicklingError("a persistent id outside a torch.save archive")
        zf, prefix = self.archive
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], StorageKind)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        kind, key = pid[1], str(pid[2])
        raw = bytearray(zf.read(f"{prefix}/data/{key}"))
        return torch.frombuffer(raw, dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)


def safe_load(file, archive=None):
    """Unpickle `file` with SafeUnpickler -> (object, list of the globals the file named)."""
    u = SafeUnpickler(file, archive)
    return u.load(), u.globals_seen
