"""Writing the torch_utils.persistence record form: pickles that EDM's / SiD's own loader reads.

    records_of(net, module_src)  -> a PersistentRecord tree mirroring `net` (our module), each
                                    record naming EDM's class (our classes carry EDM's names and
                                    attributes) and holding `module_src` as its source
    dump_records(obj, file)      -> pickle obj (dicts, records, tensors, inert placeholders)

No code of ours is referenced by the output: records become the global
torch_utils.persistence._reconstruct_persistent_obj with their meta dict, placeholders their original
globals, tensors torch's own reduction. `module_src` is the source the official loader will exec():
for an export it is taken from the user's own EDM / SiD snapshot (the template), never written by us.
"""
from __future__ import annotations

import copyreg
import pickle
from collections import OrderedDict

from torch import nn

from .unpickle import PERSISTENCE_GLOBAL, Inert, PersistentRecord, placeholder

PERSISTENCE_VERSION = 6          # torch_utils.persistence._version in EDM and SiD
TORCH_MODULE_KEYS = ("training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules",
                     "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook", "_forward_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                     "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
                     "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class GlobalRef:
    """A module-level name to write as a pickle global without importing it."""
    _cache: dict = {}

    def __new__(cls, module: str, name: str):
        key = (module, name)
        if key not in cls._cache:
            obj = super().__new__(cls)
            obj.key = key
            cls._cache[key] = obj
        return cls._cache[key]

    def __call__(self, *args):   # pickle requires a callable; this one is only ever written
        raise TypeError(f"{'.'.join(self.key)} is a name to write, not a function to call")


def _module_state(m: nn.Module, module_src: str, init_kwargs: dict | None) -> dict:
    """The instance dict torch would pickle for `m`, with submodules turned into records."""
    state = {}
    for k, v in m.__dict__.items():
        if k == "_modules":
            v = OrderedDict((n, None if s is None else _record_or_container(s, module_src)) for n, s in v.items())
        elif k == "_parameters":
            v = OrderedDict((n, None if p is None else nn.Parameter(p.detach().cpu().clone(), requires_grad=False))
                            for n, p in v.items())
        elif k == "_buffers":
            v = OrderedDict((n, None if b is None else b.detach().cpu().clone()) for n, b in v.items())
        elif k not in TORCH_MODULE_KEYS and not isinstance(v, (bool, int, float, str, type(None), list, tuple, dict,
                                                               set)):
            raise TypeError(f"{type(m).__name__}.{k} is a {type(v).__name__}; only plain attributes can be exported")
        state[k] = v
    state["_init_args"] = ()
    state["_init_kwargs"] = dict(init_kwargs or {})
    return state


def _record_or_container(m: nn.Module, module_src: str):
    if type(m).__module__.startswith("torch.nn"):   # ModuleDict: a torch class, rebuilt by its global
        cls = placeholder(type(m).__module__, type(m).__name__)
        obj = cls.__new__(cls)
        obj.state = _module_state(m, module_src, None)
        del obj.state["_init_args"], obj.state["_init_kwargs"]
        return obj
    return PersistentRecord(dict(type="class", version=PERSISTENCE_VERSION, module_src=module_src,
                                 class_name=type(m).__name__, state=_module_state(m, module_src, None)))


def records_of(net: nn.Module, module_src: str, init_kwargs: dict | None = None) -> PersistentRecord:
    """The persistence record tree of `net`; `init_kwargs` are recorded on the top-level record."""
    rec = _record_or_container(net, module_src)
    rec.state["_init_kwargs"] = dict(init_kwargs or {})
    return rec


class RecordPickler(pickle._Pickler):   # the Python pickler: save_global can be overridden
    def reducer_override(self, obj):
        if isinstance(obj, GlobalRef):
            return obj.key[1]            # -> save_global(obj, name) below
        if isinstance(obj, PersistentRecord):
            return GlobalRef(*PERSISTENCE_GLOBAL), (obj.meta,)
        if isinstance(obj, Inert):
            cls = type(obj)
            items = iter(obj.items()) if len(obj) else None
            lst = iter(obj.items_list) if obj.items_list else None
            if obj.how == "newobj":
                return copyreg.__newobj__, (cls, *obj.args), obj.state, lst, items
            if obj.how == "reconstructor":
                return GlobalRef("copyreg", "_reconstructor"), (cls, *obj.args), obj.state, lst, items
            return GlobalRef(*cls._global), obj.args, obj.state, lst, items
        return NotImplemented

    def save_global(self, obj, name=None):
        if isinstance(obj, GlobalRef):
            module, name = obj.key
        elif isinstance(obj, type) and issubclass(obj, Inert):
            module, name = obj._global
        else:
            return super().save_global(obj, name)
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("utf-8"))
        self.memoize(obj)


def dump_records(obj, file, protocol: int = 4) -> None:
    RecordPickler(file, protocol=protocol).dump(obj)

