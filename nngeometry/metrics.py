"""Entry points: Fisher information matrices (and, re-exported, Hessians, Jacobians and Gram
matrices) of a model."""
from enum import Enum

from ._entry import check_representation, prepare_entry
from .backend import TorchHooksJacobianBackend
from .variants import closed_form_function, monte_carlo_function


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


def _drop_n_output(kwargs):
    # n_output: required by early releases (the number of outputs), ignored since; it must not
    # reach the representation
    kwargs.pop("n_output", None)
    return kwargs


def FIM(model, loader, representation, variant="classif_logits", device=None, function=None,
        layer_collection=None, verbose=False, check_deterministic=True, **kwargs):
    """The Fisher information matrix in closed form, in the chosen representation.

    Computes ``F = (1/n) Σ_x J_f(x)ᵀ Σ_{y|x} J_f(x)`` with ``f(x)`` the model's outputs on
    example ``x``, ``J_f`` their Jacobian w.r.t. the parameters, ``n`` the number of examples
    seen (the mean over examples, not the sum), and the expectation over ``y ~ p(y|x)`` done
    exactly:

    * ``classif_logits``: ``p = softmax(f)``, ``Σ = diag(p) - p pᵀ`` (C - 1 backward directions);
    * ``classif_binary_logits``: one logit, ``Σ = σ(f)(1 - σ(f))``;
    * ``regression``: unit-variance Gaussian, ``Σ = I``.

    Targets in the loader are not used.

    Args:
        model: the ``torch.nn.Module``.
        loader: a DataLoader (or a single mini-batch) of ``(inputs, targets, ...)``.
        representation: a ``PMat*`` class (e.g. ``PMatDense``, ``PMatKFAC``).
        variant: see above.
        device: kept for compatibility; batches are moved to the model's device.
        function: ``function(*batch) -> outputs (n, C)``; default ``model(batch[0])``.
        layer_collection: the layers to include; default all layers of the model.
        verbose: show a progress bar.
        check_deterministic: refuse a random model (dropout in training mode; a second run
            of the model on the first batch that differs): ``RuntimeError`` naming
            ``model.eval()``. ``False`` skips the check (see ``TorchHooksJacobianBackend``).
        **kwargs: passed to the representation (``n_output=``, which older code passes, is
            ignored); a keyword the representation does not take is refused (``TypeError``).

    ``PMatEye`` without ``scaling=`` is refused (``ValueError``): it is not built from data.
    """
    kwargs = _drop_n_output(kwargs)
    check_representation(representation, kwargs, "FIM")
    function, layer_collection = prepare_entry(model, function, layer_collection)
    generator = TorchHooksJacobianBackend(
        model, closed_form_function(function, _variant_name(variant)), verbose=verbose,
        layer_collection=layer_collection, check_deterministic=check_deterministic)
    return representation(layer_collection=layer_collection, generator=generator, examples=loader,
                          **kwargs)


def FIM_MonteCarlo(model, loader, representation, variant="classif_logits", trials=1, device=None,
                   function=None, layer_collection=None, verbose=False, covariance=1.0,
                   check_deterministic=True, **kwargs):
    """The Fisher information matrix estimated with sampled targets.

    Computes ``F = (1/n) Σ_x (1/T) Σ_t ∇log p(y_t|x) ∇log p(y_t|x)ᵀ`` with ``y_t ~ p(·|x)``
    (``T = trials``); an unbiased estimate of :func:`FIM`, at the cost of ``trials`` backward
    directions instead of ``C - 1``.

    Variants: ``classif_logits`` (outputs are logits), ``classif_logsoftmax`` (outputs are
    log-probabilities), ``segmentation_logits`` (outputs ``(n, C, H, W)``: one label sampled per
    pixel, log-probabilities summed over pixels), ``regression`` (``y ~ N(f, covariance·I)``;
    returns the Fisher ``JᵀJ / covariance``, where upstream nngeometry returned
    ``covariance·JᵀJ``; ``covariance`` must be finite and positive).

    The targets are drawn from PyTorch's global RNG (``torch.multinomial`` / exponential draws
    for the classification variants, ``torch.randn`` for ``regression``, on the outputs'
    device): that is the only global state a call changes. Memory grows linearly with
    ``trials`` (the trials' backward directions are taken in chunks).

    ``check_deterministic``, the other keywords and ``PMatEye``: as for :func:`FIM` (the check
    runs the model, not the sampling).
    """
    kwargs = _drop_n_output(kwargs)
    check_representation(representation, kwargs, "FIM_MonteCarlo")
    function, layer_collection = prepare_entry(model, function, layer_collection)
    generator = TorchHooksJacobianBackend(
        model, monte_carlo_function(function, _variant_name(variant), trials, covariance),
        verbose=verbose, layer_collection=layer_collection,
        check_deterministic=check_deterministic)
    return representation(layer_collection=layer_collection, generator=generator, examples=loader,
                          **kwargs)


# the other entry points live in their own modules (upstream's paths); importable from here too
from .hessian import Hessian  # noqa: E402
from .jacobian import Jacobian  # noqa: E402
from .gram import GramMatrix  # noqa: E402

__all__ = ["FIM", "FIM_MonteCarlo", "FIM_Types", "Hessian", "Jacobian", "GramMatrix"]
