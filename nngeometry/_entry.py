"""What the entry points (FIM, Hessian, Jacobian, GramMatrix) share: the defaults of their
arguments and the checks of the representation and its keywords."""
import inspect

from .backend import TorchHooksJacobianBackend
from .backend.model_and_data import default_function, model_lock, unwrap_model
from .layercollection import LayerCollection
from .object import pspace
from .object.pspace import PMatEye

#: the constructor's own arguments, which the entry points pass themselves
_PASSED_BY_ENTRY = {"self", "layer_collection", "generator", "data", "examples"}


def prepare_entry(model, function, layer_collection, target_key="labels"):
    """``(function, layer_collection)`` with the defaults: ``model(batch[0])`` and all the
    layers of the model. (Batches always go to the model's device: entry points accept
    ``device`` only for compatibility.)"""
    # a DistributedDataParallel wrapper: the inner module (hooks, layer ids, default function)
    model = unwrap_model(model)
    check_not_meta(model)
    if layer_collection is None:
        # another thread's implicit product may have this model's parameters swapped for
        # functional tensors: read them when it is done
        with model_lock(model):
            layer_collection = LayerCollection.from_model(model)
    if function is None:
        function = default_function(model, target_key)
    return function, layer_collection


def check_not_meta(model):
    """``ValueError`` for a model with parameters or buffers on the ``meta`` device: they have
    shapes but no values, so nothing can be computed from them."""
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_meta for t in tensors):
        raise ValueError(
            f"the model ({type(model).__name__}) has parameters on the meta device: they have "
            "shapes but no values. Materialise them first, e.g. model.to_empty(device='cpu') "
            "then model.load_state_dict(weights), or load_state_dict(weights, assign=True)")


# the names accepted for the classes: lower case, with and without the "PMat" prefix
def _representation_names():
    names = {}
    for cls_name in pspace.__all__:
        cls = getattr(pspace, cls_name)
        if isinstance(cls, type) and issubclass(cls, pspace.PMatAbstract) and \
                cls is not pspace.PMatAbstract:
            names[cls_name.lower()] = cls
            names[cls_name[4:].lower()] = cls
    return names


def resolve_representation(representation, entry):
    """The representation class: ``representation`` itself, or the class named by a string
    (``'kfac'``, ``'dense'``, ``'diag'``, ``'blockdiag'``, ``'ekfac'``, ``'lowrank'``,
    ``'quasidiag'``, ``'implicit'``, ... or the class name ``'PMatKFAC'``; case-insensitive,
    ``_`` and ``-`` ignored). Anything else that is not callable: ``TypeError`` listing the
    names."""
    if isinstance(representation, str):
        names = _representation_names()
        key = representation.lower().replace("_", "").replace("-", "")
        if key in names:
            return names[key]
        short = sorted(k for k in names if not k.startswith("pmat"))
        raise ValueError(
            f"{entry}: unknown representation {representation!r}; pass a PMat* class (e.g. "
            f"nngeometry.object.PMatKFAC) or one of the names {', '.join(short)} "
            "(case-insensitive)")
    if not callable(representation):
        raise TypeError(
            f"{entry}: representation must be a PMat* class (e.g. nngeometry.object.PMatKFAC, "
            f"PMatDense, PMatDiag) or its name ('kfac', 'dense', 'diag', ...), got "
            f"{type(representation).__name__}")
    return representation


def build_from_jacobians(model, loader, representation, function, layer_collection, centering,
                         verbose, check_deterministic, distributed=None, process_group=None):
    """``representation`` (a map or function-space matrix class) built from the per-example
    Jacobians of ``function`` over ``loader``: what ``Jacobian`` and ``GramMatrix`` share.
    Data-parallel (``distributed``, ``process_group``: see ``TorchHooksJacobianBackend``): the
    examples of all the ranks, in rank order."""
    model = unwrap_model(model)
    function, layer_collection = prepare_entry(model, function, layer_collection)
    generator = TorchHooksJacobianBackend(model, function, centering=centering, verbose=verbose,
                                          layer_collection=layer_collection,
                                          check_deterministic=check_deterministic,
                                          distributed=distributed, process_group=process_group)
    return representation(layer_collection=layer_collection, generator=generator,
                          examples=loader)


def _named_keywords(fn):
    """``(names, open)``: the keyword parameters of ``fn`` and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def check_representation(representation, kwargs, entry):
    """The representation class (a name resolved by `resolve_representation`), after
    refusing what a build from data cannot honour: ``PMatEye`` without ``scaling=`` (a fixed
    ``scaling · I``, built from no data: the identity would be returned, the data ignored) and
    keywords that neither the representation's
    constructor nor its ``_build`` take (they would be swallowed by ``**kwargs`` and ignored,
    e.g. ``regul=``, which belongs to ``solve`` / ``inverse``). Only nngeometry's own classes
    are checked: a user's class may read any keyword."""
    representation = resolve_representation(representation, entry)
    if isinstance(representation, type) and issubclass(representation, PMatEye) and \
            "scaling" not in kwargs and "data" not in kwargs:
        # with an explicit scaling= the caller asks for that fixed matrix (accepted, as before)
        raise ValueError(
            f"{entry}(..., PMatEye) would ignore the model and the data: PMatEye is the fixed "
            "matrix scaling·I, not built from data. Construct it directly, "
            "PMatEye(layer_collection, scaling=s), or pick a representation built from the data "
            "(PMatDense, PMatDiag, PMatKFAC, ...)")
    if not kwargs or not isinstance(representation, type) or \
            not representation.__module__.startswith("nngeometry."):
        return representation
    accepted, open_init = _named_keywords(representation.__init__)
    build = getattr(representation, "_build", None)
    if build is not None:
        build_names, _ = _named_keywords(build)
        accepted |= build_names
    accepted -= _PASSED_BY_ENTRY
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown and (open_init or build is not None):
        listed = ", ".join(sorted(accepted)) if accepted else "none"
        hint = (" (regul is an argument of solve / inverse / pow, not of the build)"
                if "regul" in unknown else "")
        raise TypeError(
            f"{entry}() got keyword arguments that {representation.__name__} does not use: "
            f"{', '.join(unknown)}{hint}. Keywords it accepts at build time: {listed}")
    return representation
