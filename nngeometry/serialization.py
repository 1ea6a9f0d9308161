"""State dicts that load with plain ``torch.load(f)``.

Since PyTorch 2.6, ``torch.load`` defaults to ``weights_only=True``: it rebuilds tensors,
numbers, strings, ``None`` and containers (dicts, lists, tuples) and refuses every other class
(``Unsupported global: ...``) unless the class is registered with
``torch.serialization.add_safe_globals``. The objects of this library (representations,
``PVector``, ``LayerCollection`` and its layer specs) are therefore saved as *state dicts*:
`to_state` turns an object, or any container of objects, into such plain data, and
`from_state` rebuilds it:

```
torch.save(F.state_dict(), "fisher.pt")                      # F: any PMat*
F = PMatKFAC.from_state_dict(torch.load("fisher.pt"))        # default weights_only=True
```

The plain form of an object of this library is a dict
``{"__nng_object__": "module:QualName", "__nng_state__": <its pickled state, in plain form>}``
(the state is what pickling saves: ``__getstate__``, so the generator, which holds the model
and a user function, and recomputable caches are left out, exactly as ``pickle.dumps``
leaves them out). Other tags: ``__nng_tuple__``, ``__nng_odict__`` (an ``OrderedDict``),
``__nng_items__`` (a dict with keys that are not strings), ``__nng_set__``, ``__nng_dtype__``,
``__nng_device__``, and ``__nng_ref__`` for an object met a second time (shared objects stay
shared). Tensors are saved detached. Rebuilding only ever imports classes defined in
``nngeometry`` (never a function, never another package's class), and builds them without
running their constructors (``cls.__new__`` then ``__setstate__``), as unpickling does.
"""
import copy
import importlib
from collections import OrderedDict

import torch

_OBJ, _STATE, _ID, _REF = "__nng_object__", "__nng_state__", "__nng_id__", "__nng_ref__"
_TUPLE, _ODICT, _ITEMS = "__nng_tuple__", "__nng_odict__", "__nng_items__"
_SET, _FSET, _DTYPE, _DEVICE = "__nng_set__", "__nng_frozenset__", "__nng_dtype__", "__nng_device__"
_PREFIX = "__nng_"
_PACKAGE = __name__.split(".")[0]


def _ours(cls):
    return cls.__module__ == _PACKAGE or cls.__module__.startswith(_PACKAGE + ".")


def to_state(obj):
    """``obj`` (an object of this library, or numbers, strings, tensors and containers of
    them) as plain data that ``torch.load(f)`` reads with its defaults. ``TypeError`` naming
    where an object that can't be stored sits (a function, a model, a data loader...)."""
    return _Encoder().encode(obj, "state")


def from_state(state):
    """The object that `to_state` turned into ``state`` (a plain dict is returned as a
    dict of rebuilt values; objects that are not in plain form are returned as they are, so
    that state dicts saved by earlier releases, which held the objects themselves, load too)."""
    return _Decoder().decode(state, "state")


class _Encoder:
    def __init__(self):
        self.ids = {}
        self.keep = []  # the encoded objects stay alive: their ids stay unique

    def encode(self, obj, path):
        if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
            return obj
        if isinstance(obj, torch.Tensor):
            return obj.detach().as_subclass(torch.Tensor) if type(obj) is not torch.Tensor \
                else obj.detach()
        if isinstance(obj, torch.dtype):
            return {_DTYPE: str(obj).replace("torch.", "")}
        if isinstance(obj, torch.device):
            return {_DEVICE: str(obj)}
        if isinstance(obj, torch.Size):
            return {_TUPLE: [int(s) for s in obj]}
        if isinstance(obj, list):
            return [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {_TUPLE: [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, (set, frozenset)):
            tag = _FSET if isinstance(obj, frozenset) else _SET
            return {tag: [self.encode(v, f"{path}{{}}") for v in obj]}
        if isinstance(obj, OrderedDict):
            return {_ODICT: [[self.encode(k, f"{path} key"), self.encode(v, f"{path}[{k!r}]")]
                             for k, v in obj.items()]}
        if type(obj) is dict:
            if all(isinstance(k, str) and not k.startswith(_PREFIX) for k in obj):
                return {k: self.encode(v, f"{path}[{k!r}]") for k, v in obj.items()}
            return {_ITEMS: [[self.encode(k, f"{path} key"), self.encode(v, f"{path}[{k!r}]")]
                             for k, v in obj.items()]}
        cls = type(obj)
        if not _ours(cls) or not isinstance(getattr(obj, "__dict__", None), dict):
            raise TypeError(
                f"{path} is a {cls.__module__}.{cls.__qualname__}, which a state dict cannot "
                "hold (plain tensors, numbers, strings and containers, and this library's "
                "objects, only): a PMatImplicit / PFMapImplicit keeps its examples (a data "
                "loader) and must be rebuilt from the data; otherwise remove this object")
        key = id(obj)
        if key in self.ids:
            return {_REF: self.ids[key]}
        self.ids[key] = len(self.ids)
        self.keep.append(obj)
        state = obj.__getstate__()
        return {_OBJ: f"{cls.__module__}:{cls.__qualname__}", _ID: self.ids[key],
                _STATE: self.encode(state, f"{path}.<{cls.__name__}>")}


class _Decoder:
    def __init__(self):
        self.objects = {}

    def decode(self, data, path):
        if isinstance(data, list):
            return [self.decode(v, f"{path}[{i}]") for i, v in enumerate(data)]
        if isinstance(data, tuple):  # pickled tuples (legacy state dicts) stay tuples
            return tuple(self.decode(v, f"{path}[{i}]") for i, v in enumerate(data))
        if not isinstance(data, dict):
            return data
        if type(data) is OrderedDict:
            return OrderedDict((k, self.decode(v, f"{path}[{k!r}]")) for k, v in data.items())
        if len(data) == 1:
            (tag, value), = data.items()
            if tag == _TUPLE:
                return tuple(self.decode(v, f"{path}[{i}]") for i, v in enumerate(value))
            if tag == _ODICT:
                return OrderedDict((self.decode(k, path), self.decode(v, f"{path}[{k!r}]"))
                                   for k, v in value)
            if tag == _ITEMS:
                return {self.decode(k, path): self.decode(v, f"{path}[{k!r}]") for k, v in value}
            if tag in (_SET, _FSET):
                items = [self.decode(v, path) for v in value]
                return frozenset(items) if tag == _FSET else set(items)
            if tag == _DTYPE:
                dtype = getattr(torch, value, None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"{path}: unknown dtype {value!r}")
                return dtype
            if tag == _DEVICE:
                return torch.device(value)
            if tag == _REF:
                if value not in self.objects:
                    raise ValueError(f"{path}: reference to object {value}, which comes later "
                                     "or not at all: the state dict was altered")
                return self.objects[value]
        if _OBJ in data:
            return self._object(data, path)
        return {k: self.decode(v, f"{path}[{k!r}]") for k, v in data.items()}

    def _object(self, data, path):
        cls = _class(data[_OBJ], path)
        obj = cls.__new__(cls)
        if _ID in data:
            self.objects[data[_ID]] = obj
        state = self.decode(data.get(_STATE), f"{path}.<{cls.__name__}>")
        _restore(obj, state)
        return obj


def _class(name, path):
    """The class ``"module:QualName"``, which must be defined in this library."""
    module_name, _, qualname = str(name).partition(":")
    if not (module_name == _PACKAGE or module_name.startswith(_PACKAGE + ".")) or not qualname:
        raise ValueError(f"{path}: {name!r} is not a class of {_PACKAGE}; a state dict of "
                         f"{_PACKAGE} rebuilds only its own classes")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"{path}: {name!r} does not exist in this version of {_PACKAGE}")
    if not isinstance(obj, type) or not _ours(obj):
        raise ValueError(f"{path}: {name!r} is not a class of {_PACKAGE}")
    return obj


class StateDictMixin:
    """``state_dict()`` / ``from_state_dict()`` through `to_state` / `from_state`:
    plain data that ``torch.load(f)`` reads with its defaults (``weights_only=True``)."""

    def state_dict(self):
        """This object as plain tensors, numbers, strings and containers (see
        `nngeometry.serialization`): ``torch.save(obj.state_dict(), f)``, then
        ``type(obj).from_state_dict(torch.load(f))``. What is left out is what pickling leaves
        out (the generator, which holds the model: set it again for the operations that run
        the model)."""
        return to_state(self)

    @classmethod
    def from_state_dict(cls, state):
        """The object saved by `state_dict` (``TypeError`` if ``state`` holds another
        kind of object than ``cls``)."""
        obj = from_state(state)
        if not isinstance(obj, cls):
            raise TypeError(f"this state dict holds a {type(obj).__name__}, not a "
                            f"{cls.__name__}: load it with {type(obj).__name__}.from_state_dict")
        return obj


class SharedGeneratorCopy:
    """``copy.copy`` / ``copy.deepcopy`` of an object that may hold a generator (the model and
    its function) and examples: the copy shares them (a deep copy copies the matrix's own data,
    not the model it is computed from, nor the data set), so that it supports every operation
    the original does (``PMatImplicit`` products, ``PMatEKFAC.update_diag``). Recomputable
    caches are not copied (those that pickling leaves out)."""

    _shared_on_copy = ("generator", "examples")

    def _copy_state(self):
        state = self.__getstate__()
        for name in self._shared_on_copy:
            if name in self.__dict__:
                state[name] = self.__dict__[name]
        return state

    def __copy__(self):
        new = type(self).__new__(type(self))
        _restore(new, self._copy_state())
        return new

    def __deepcopy__(self, memo):
        state = self._copy_state()
        for name in self._shared_on_copy:
            value = state.get(name)
            if value is not None:
                memo.setdefault(id(value), value)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        _restore(new, copy.deepcopy(state, memo))
        return new


def _restore(obj, state):
    """What unpickling does with ``state``: ``__setstate__``, else the instance dict."""
    setstate = getattr(obj, "__setstate__", None)
    if setstate is not None:
        setstate(state)
    elif state is not None:
        obj.__dict__.update(state)


__all__ = ["to_state", "from_state", "StateDictMixin", "SharedGeneratorCopy"]
