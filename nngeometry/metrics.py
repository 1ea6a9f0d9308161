"""Entry points: Fisher information matrices (and, re-exported, Hessians, Jacobians and Gram
matrices) of a model."""
import warnings
from enum import Enum

import torch

from ._entry import check_representation, prepare_entry
from .backend import TorchHooksJacobianBackend
from .backend.model_and_data import unwrap_model
from .curvature import (closed_form_function, empirical_function, ggn_function, lm_convention,
                        monte_carlo_function)
from .layer_types.base import check_kfac_support
from .layer_types.subnetwork import SubnetworkLayer
from .layercollection import LayerCollection
from .object.pspace import PMatDense, PMatDiag, PMatEKFAC, PMatKFAC, PMatMixed


class FIM_Types(str, Enum):
    """The names of the likelihoods that ``FIM`` / ``FIM_MonteCarlo`` accept as ``variant``.
    Members are strings (``FIM_Types.CLASSIF_LOGITS == "classif_logits"``): either form may be
    passed."""

    CLASSIF_LOGITS = "classif_logits"
    CLASSIF_BINARY_LOGITS = "classif_binary_logits"
    CLASSIF_LOGSOFTMAX = "classif_logsoftmax"
    SEGMENTATION_LOGITS = "segmentation_logits"
    REGRESSION = "regression"


def _variant_name(variant):
    return variant.value if isinstance(variant, FIM_Types) else variant


def subnetwork_collection(layer_collection, subnetwork_indices):
    """``(indices, collection)``: the checked flat indices (``(k,)`` int64, CPU) and the
    one-layer collection ``{'subnetwork': SubnetworkLayer}`` of a subnetwork of
    ``layer_collection``."""
    P = layer_collection.numel()
    idx = torch.as_tensor(subnetwork_indices)
    if idx.dtype == torch.bool:
        if idx.shape != (P,):
            raise ValueError(f"a boolean subnetwork mask must have one entry per parameter "
                             f"({P}), got shape {tuple(idx.shape)}")
        idx = torch.nonzero(idx).reshape(-1)
    if idx.is_floating_point() or idx.is_complex() or idx.dim() != 1 or idx.numel() == 0:
        raise ValueError("subnetwork_indices must be a non-empty 1-D tensor (or list) of integer "
                         "flat parameter indices, or a boolean mask of length P, got "
                         f"{idx.dtype} of shape {tuple(idx.shape)}")
    idx = idx.long().cpu()
    if int(idx.min()) < 0 or int(idx.max()) >= P:
        raise ValueError(f"subnetwork_indices must lie in [0, {P}) (the collection's {P} "
                         f"parameters), got values from {int(idx.min())} to {int(idx.max())}")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("subnetwork_indices has repeated indices: each parameter once")
    lc = LayerCollection()
    lc.add_layer("subnetwork", SubnetworkLayer(idx, layer_collection))
    lc.dtype, lc.device = layer_collection.dtype, layer_collection.device
    return idx, lc


def _tied_kfac(representation, layer_collection, generator, loader, kwargs):
    """A KFAC-family representation on a collection with tied layers (a layer whose parameters
    another module also uses, e.g. a language model's ``lm_head`` tied to its token embedding):
    the block of a tied layer is a sum of one Kronecker product per use, which KFAC/EKFAC cannot
    hold. The matrix returned is a ``PMatMixed``: ``representation`` on every other layer, and
    on each tied layer the exact diagonal of its block (both uses summed), with a one-line
    warning; None when no layer is tied or ``representation`` is not of the KFAC family."""
    tied = [lid for lid in getattr(layer_collection, "tied", {}) if lid in layer_collection.layers]
    if not tied or not isinstance(representation, type) or \
            not issubclass(representation, (PMatKFAC, PMatEKFAC)):
        return None

    warnings.warn(
        f"{representation.__name__}: tied layer(s) {', '.join(map(repr, tied))} (parameters used "
        "by several modules) get the exact diagonal of their block (PMatDiag) instead of a "
        "Kronecker factorisation; the result is a PMatMixed", stacklevel=5)
    if len(tied) == len(layer_collection.layers):
        return PMatDiag(layer_collection=layer_collection, generator=generator, examples=loader)
    mapping = {lid: PMatDiag for lid in tied}
    if representation is PMatKFAC and hasattr(generator, "accumulate") and \
            not getattr(generator, "centering", False):
        # both groups from one pass over the examples (two passes cost one more forward and
        # backward of the whole model, and drew other Monte-Carlo targets for each group)
        from .backend.consumers import DiagCovariance, KFACFactors, LayerGroups

        lc_kfac = layer_collection.sub([lid for lid in layer_collection.layer_ids()
                                        if lid not in tied])
        lc_diag = layer_collection.sub(tied)
        check_kfac_support(lc_kfac, representation.__name__)
        approx = kwargs.get("kfac_approx", "expand")
        if approx not in ("expand", "reduce"):
            raise ValueError(f"unknown kfac_approx '{approx}': use 'expand' or 'reduce'")
        res = generator.accumulate(loader, layer_collection, LayerGroups({
            "kfac": KFACFactors(lc_kfac, approx, sqrt_k_split=True),
            "diag": DiagCovariance(lc_diag)})).result
        data = {"PMatKFAC": PMatKFAC(layer_collection=lc_kfac, generator=generator,
                                     data=res["kfac"], **kwargs),
                "PMatDiag": PMatDiag(layer_collection=lc_diag, generator=generator,
                                     data=res["diag"])}
        return PMatMixed.from_mapping(layer_collection, generator, (representation, kwargs),
                                      mapping, data=data)
    return PMatMixed.from_mapping(layer_collection, generator, (representation, kwargs),
                                  mapping, examples=loader)


def _represent(representation, layer_collection, generator, loader, kwargs, subnetwork_indices):
    if subnetwork_indices is None:
        if getattr(layer_collection, "tied", None):
            tied = _tied_kfac(representation, layer_collection, generator, loader, kwargs)
            if tied is not None:
                return tied
        return representation(layer_collection=layer_collection, generator=generator,
                              examples=loader, **kwargs)

    if representation is not PMatDense:
        name = getattr(representation, "__name__", repr(representation))
        raise ValueError(f"subnetwork_indices= builds the dense k × k matrix of the subnetwork: "
                         f"pass PMatDense, not {name}")
    if kwargs:
        raise TypeError(f"keywords {sorted(kwargs)} are not used with subnetwork_indices=")
    idx, sub = subnetwork_collection(layer_collection, subnetwork_indices)
    data = generator.get_subnetwork_matrix(idx, loader, layer_collection)
    if sub.dtype is None:
        sub.dtype, sub.device = data.dtype, data.device
    return PMatDense(layer_collection=sub, data=data)


def _curvature(entry, model, loader, representation, make_transform, function,
               layer_collection, target_key, verbose, check_deterministic, subnetwork_indices,
               kwargs, causal_lm=None, validate=None):
    """What every curvature entry point does: check the representation and its keywords (and
    ``validate()`` the entry's own), read the model's language-model convention (`lm_convention`,
    from ``causal_lm``), fill in the default function and collection, and build the
    representation from a generator running ``make_transform(function, lm)``, the output
    transform whose ``Jᵀ J`` is the curvature (it checks its own ``positions`` and
    ``class_dim``). ``kwargs`` may hold ``distributed`` / ``process_group`` (for the generator,
    not the representation)."""
    distributed = kwargs.pop("distributed", None)
    process_group = kwargs.pop("process_group", None)
    # n_output: required by early releases (the number of outputs), ignored since; it must not
    # reach the representation
    kwargs.pop("n_output", None)
    representation = check_representation(representation, kwargs, entry)
    if validate is not None:
        validate()
    model = unwrap_model(model)
    # detected on the user's function (None: the model's own outputs), before the default
    lm = lm_convention(model, causal_lm, target_key, function)
    function, layer_collection = prepare_entry(model, function, layer_collection, target_key)
    generator = TorchHooksJacobianBackend(
        model, make_transform(function, lm), verbose=verbose, layer_collection=layer_collection,
        check_deterministic=check_deterministic, distributed=distributed,
        process_group=process_group)
    return _represent(representation, layer_collection, generator, loader, kwargs,
                      subnetwork_indices)


def FIM(model, loader, representation, variant="classif_logits", device=None, function=None,
        layer_collection=None, verbose=False, check_deterministic=True, positions=None,
        target_key="labels", subnetwork_indices=None, distributed=None, process_group=None,
        class_dim=None, causal_lm=None, **kwargs):
    """The Fisher information matrix in closed form, in the chosen representation.

    Computes ``F = (1/n) Σ_x J_f(x)ᵀ Σ_{y|x} J_f(x)`` with ``f(x)`` the model's outputs on
    example ``x``, ``J_f`` their Jacobian w.r.t. the parameters, ``n`` the number of examples
    seen (the mean over examples, not the sum), and the expectation over ``y ~ p(y|x)`` done
    exactly:

    * ``classif_logits``: ``p = softmax(f)``, ``Σ = diag(p) - p pᵀ`` (C - 1 backward directions);
    * ``classif_binary_logits``: one logit, ``Σ = σ(f)(1 - σ(f))``;
    * ``regression``: unit-variance Gaussian, ``Σ = I``.

    Targets in the loader are not used.

    Outputs with positions (more than 2 dimensions: ``(n, T, C)`` sequences, ``(n, C, L)``,
    ``(n, C, H, W)`` segmentation): the class axis is ``class_dim`` (required for a tensor
    output with more than 2 dimensions, ``ValueError`` without; Hugging Face ``.logits`` have
    it last); the likelihood factorises over positions, one softmax (Bernoulli, Gaussian) per
    position, and ``F`` sums the per-position terms (``positions='sum'``, the default) or
    averages them (``positions='mean'``: ``F`` divided by the number of positions ``S``, for
    losses that are means over tokens, curvlinops' ``loss_average='batch+sequence'``).

    Language models (``causal_lm``, detected for Hugging Face causal LMs): the model's own loss
    convention, see the page "Curvatures": the logits at position ``t`` describe token
    ``t + 1`` (the last position drops out), positions whose target is padding
    (``attention_mask`` 0) or labelled -100 contribute nothing, and the default
    ``positions=None`` is ``'mean'`` over each sequence's counted positions (``F`` is then the
    GGN of Hugging Face's per-sequence ``loss``); ``positions='sum'`` sums them.

    Args:
        model: the ``torch.nn.Module``.
        loader: a DataLoader (or a single mini-batch) of ``(inputs, targets, ...)``.
        representation: a ``PMat*`` class (e.g. ``PMatDense``, ``PMatKFAC``), or its name,
            case-insensitive: ``'dense'``, ``'diag'``, ``'blockdiag'``, ``'kfac'``, ``'ekfac'``,
            ``'lowrank'``, ``'quasidiag'``, ``'implicit'``, ... (or ``'PMatKFAC'``).
        variant: see above.
        device: kept for compatibility; batches are moved to the model's device.
        function: ``function(*batch) -> outputs (n, C)``; default ``model(batch[0])``.
        layer_collection: the layers to include; default all layers of the model.
        verbose: show a progress bar.
        check_deterministic: refuse a random model (dropout in training mode; a second run
            of the model on the first batch that differs): ``RuntimeError`` naming
            ``model.eval()``. ``False`` skips the check (see ``TorchHooksJacobianBackend``).
        positions: ``'sum'`` or ``'mean'`` over the positions of the outputs (see above);
            None (default): ``'mean'`` under a language model's convention, else ``'sum'``.
        target_key: for dict batches, the key of the targets, left out of ``model(**inputs)``.
        subnetwork_indices: flat parameter indices ``idx`` (of the collection's layout; a
            ``(k,)`` integer tensor or list, or a boolean mask of length ``P``), with
            ``PMatDense``: the ``k × k`` matrix ``M[idx][:, idx]`` without forming ``P × P``
            (laplace-torch's subnetwork Laplace), a ``PMatDense`` on a collection of one layer
            ``'subnetwork'`` of ``k`` parameters (PVectors on it have ``k`` entries).
        distributed: data parallelism over ``torch.distributed``: ``None`` (default: on when a
            process group is initialised and has more than one rank), ``True`` or ``False``.
            When on, ``loader`` is this rank's shard (e.g. with a ``DistributedSampler``) and
            every rank gets the matrix of all the ranks' examples (``n`` the global count);
            see the page "Data-parallel and GPU". A ``DistributedDataParallel`` model is
            accepted (its ``.module`` is used).
        process_group: the group to reduce over (default: the world).
        class_dim: the axis of the outputs that holds the classes, for outputs with more than
            2 dimensions (``-1``: ``(n, T, C)``; ``1``: ``(n, C, L)``, ``(n, C, H, W)``).
        causal_lm: ``None`` (default) detects a causal language model (Hugging Face's
            ``*ForCausalLM`` / ``*LMHeadModel``, ``loss_type='ForCausalLM'``) when ``function``
            is not given (a user's function defines its own outputs); ``True`` applies
            its convention (shifted positions), ``False`` the convention without the shift
            (masked LM, token classification: padding and -100 excluded).
        **kwargs: passed to the representation (``n_output=``, which older code passes, is
            ignored); a keyword the representation does not take is refused (``TypeError``).

    ``PMatEye`` without ``scaling=`` is refused (``ValueError``): it is not built from data.
    """
    return _curvature(
        "FIM", model, loader, representation,
        lambda f, lm: closed_form_function(f, _variant_name(variant), positions, class_dim, lm),
        function, layer_collection, target_key, verbose, check_deterministic,
        subnetwork_indices, dict(kwargs, distributed=distributed, process_group=process_group),
        causal_lm)


def FIM_MonteCarlo(model, loader, representation, variant="classif_logits", trials=1, device=None,
                   function=None, layer_collection=None, verbose=False, covariance=1.0,
                   check_deterministic=True, seed=None, positions=None, target_key="labels",
                   subnetwork_indices=None, distributed=None, process_group=None,
                   class_dim=None, causal_lm=None, **kwargs):
    """The Fisher information matrix estimated with sampled targets.

    Computes ``F = (1/n) Σ_x (1/T) Σ_t ∇log p(y_t|x) ∇log p(y_t|x)ᵀ`` with ``y_t ~ p(·|x)``
    (``T = trials``); an unbiased estimate of [`FIM`][nngeometry.FIM], at the cost of ``trials`` backward
    directions instead of ``C - 1``.

    Variants: ``classif_logits`` (outputs are logits), ``classif_logsoftmax`` (outputs are
    log-probabilities), ``segmentation_logits`` (outputs ``(n, C, H, W)``: one label sampled per
    pixel, log-probabilities summed over pixels), ``regression`` (``y ~ N(f, covariance·I)``;
    returns the Fisher ``JᵀJ / covariance``, where upstream nngeometry returned
    ``covariance·JᵀJ``; ``covariance`` must be finite and positive).

    Outputs with positions (more than 2 dimensions, the class axis ``class_dim``; the
    ``segmentation_logits`` variant has it at 1): one target per position, the
    log-probabilities summed over positions (``positions='sum'``) or averaged (``'mean'``);
    language models (``causal_lm``): as for [`FIM`][nngeometry.FIM].

    ``seed`` (an int): the sampled targets are a fixed function of the seed, the batch's index
    in the loader and the batch's content (no RNG state is read or changed), so that every pass
    over the loader sees the same targets: the same matrix on every build, and a
    ``PMatImplicit`` that is one fixed matrix (two products with it agree, as CG, Lanczos and
    Hutchinson need). See `nngeometry.curvature.monte_carlo_function`.

    Without ``seed`` the targets are drawn from PyTorch's global RNG (``torch.multinomial`` /
    exponential draws, the inverse CDF for one trial of 1024 classes or more, for the
    classification variants, ``torch.randn`` for ``regression``, on the outputs'
    device): that is the only global state a call changes. Memory grows linearly with
    ``trials`` (the trials' backward directions are taken in chunks).

    ``check_deterministic``, the other keywords and ``PMatEye``: as for [`FIM`][nngeometry.FIM] (the check
    runs the model, not the sampling).
    """
    return _curvature(
        "FIM_MonteCarlo", model, loader, representation,
        lambda f, lm: monte_carlo_function(f, _variant_name(variant), trials, covariance,
                                           positions=positions, seed=seed, class_dim=class_dim,
                                           lm=lm), function,
        layer_collection, target_key, verbose, check_deterministic, subnetwork_indices,
        dict(kwargs, distributed=distributed, process_group=process_group), causal_lm)


def EmpiricalFisher(model, loader, representation, loss_function=None, device=None,
                    function=None, layer_collection=None, verbose=False,
                    check_deterministic=True, positions=None, target_key="labels",
                    subnetwork_indices=None, distributed=None, process_group=None,
                    class_dim=None, causal_lm=None, **kwargs):
    """The empirical Fisher ``(1/n) Σ_i ∇θℓ_i ∇θℓ_iᵀ``, ``ℓ_i`` the loss of example ``i`` for
    its observed target, in the chosen representation (every one built from data: Dense,
    BlockDiag, Diag, QuasiDiag, LowRank, KFAC, EKFAC, Implicit, Mixed).

    Not a Fisher information (the targets are the data's, not the model's): it equals the
    Fisher only in expectation over targets drawn from the model. One backward direction per
    example.

    Args:
        loss_function: ``loss_function(outputs, *targets) -> (n,)`` per-example losses, e.g.
            ``lambda out, y: F.cross_entropy(out, y, reduction='none')``; a loss per position
            ``(n, T)`` is summed over positions (``positions='sum'``) or averaged (``'mean'``).
            ``targets`` is ``batch[1:]``, or ``(batch[target_key],)`` for dict batches. Default:
            cross-entropy on logits (one per position for outputs with more than 2 dimensions,
            the classes along ``class_dim``; targets -100 ignored, as in PyTorch).

    Language models (``causal_lm``, detected for Hugging Face causal LMs): the model's own
    loss, with shifted labels (position ``t`` predicts token ``t + 1``), -100 labels and
    padding (``attention_mask`` 0) excluded, and by default (``positions=None``) each
    sequence's loss is the mean over its counted tokens: ``(1/n) Σ_i g_i g_iᵀ`` with ``g_i``
    the gradient of Hugging Face's ``model(**batch_i).loss`` on sequence ``i`` alone;
    ``positions='sum'`` sums over the tokens instead. A ``loss_function`` then gets the
    shifted logits ``(n, T-1, V)`` and labels ``(n, T-1)`` (-100 where a position does not
    count).

    The other arguments are as for [`FIM`][nngeometry.FIM].
    """
    return _curvature(
        "EmpiricalFisher", model, loader, representation,
        lambda f, lm: empirical_function(f, loss_function, positions, target_key, class_dim, lm),
        function,
        layer_collection, target_key, verbose, check_deterministic, subnetwork_indices,
        dict(kwargs, distributed=distributed, process_group=process_group), causal_lm)


def GGN(model, loader, representation, loss_function, device=None, function=None,
        layer_collection=None, verbose=False, check_deterministic=True, positions=None,
        target_key="labels", subnetwork_indices=None, distributed=None, process_group=None,
        class_dim=None, causal_lm=None, **kwargs):
    """The generalized Gauss-Newton matrix ``(1/n) Σ_i J_iᵀ H_i J_i`` of a loss, in the chosen
    representation (Dense, BlockDiag, Diag, QuasiDiag, LowRank, KFAC, EKFAC, Implicit, Mixed).

    ``J_i``: the Jacobian of example ``i``'s outputs (``D`` of them, flattened) w.r.t. the
    parameters; ``H_i = ∇²_f ℓ_i`` the Hessian of its loss w.r.t. its outputs, computed with
    ``torch.func.hessian`` (vmapped over the examples) and factored ``H_i = S_i S_iᵀ`` by an
    eigendecomposition: ``D`` backward directions per example, as ``FIM(variant='regression')``.
    Any loss convex in the outputs: weighted MSE, Gaussian NLL with a given variance, Poisson,
    cross-entropy with label smoothing... A loss whose ``H_i`` has a negative eigenvalue is
    refused (``ValueError``). For ``F.cross_entropy`` the GGN equals
    ``FIM(variant='classif_logits')``, for ``0.5·||f - y||²`` ``FIM(variant='regression')``.

    Memory: ``n · D²`` numbers per batch for the ``H_i`` (checked): for a language model's
    ``(n, T, vocabulary)`` outputs use ``FIM(variant='classif_logits')`` (the same matrix for
    the cross-entropy, without the ``(T·V)²`` Hessians).

    Args:
        loss_function: ``loss_function(outputs, *targets) -> (n,)`` per-example losses (as
            for [`EmpiricalFisher`][nngeometry.EmpiricalFisher]; required). It must treat examples independently.

    Language models (``causal_lm``): the convention of [`EmpiricalFisher`][nngeometry.EmpiricalFisher];
    ``'cross_entropy'`` and ``nn.CrossEntropyLoss(reduction='none')`` in closed form, a
    callable through the output Hessians of the convention's loss (it gets the shifted logits
    and labels, as for [`EmpiricalFisher`][nngeometry.EmpiricalFisher]).

    The other arguments are as for [`FIM`][nngeometry.FIM].
    """
    return _curvature(
        "GGN", model, loader, representation,
        lambda f, lm: ggn_function(f, loss_function, positions, target_key, class_dim, lm),
        function,
        layer_collection, target_key, verbose, check_deterministic, subnetwork_indices,
        dict(kwargs, distributed=distributed, process_group=process_group), causal_lm)


# the other entry points live in their own modules (upstream's paths); importable from here too
from .hessian import Hessian  # noqa: E402
from .jacobian import Jacobian  # noqa: E402
from .gram import GramMatrix  # noqa: E402

__all__ = ["FIM", "FIM_MonteCarlo", "FIM_Types", "EmpiricalFisher", "GGN", "Hessian", "Jacobian", "GramMatrix"]

# Upstream import paths: re-exports only (upstream's module exposed these through its own
# imports; LayerCollection, imported above, is one of them too)
from functools import partial  # noqa: E402,F401
