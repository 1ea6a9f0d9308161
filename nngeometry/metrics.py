"""Entry points: Fisher information matrices, Jacobians and Gram matrices of a model."""
from .backend import TorchHooksJacobianBackend
from .backend.batches import default_function
from .layercollection import LayerCollection
from .object.fspace import FMatDense
from .object.map import PFMapDense
from .variants import closed_form_function, monte_carlo_function


def _prepare(model, device, function, layer_collection):
    # `device` is accepted for compatibility: batches are always moved to the model's device
    if layer_collection is None:
        layer_collection = LayerCollection.from_model(model)
    if function is None:
        function = default_function(model)
    return function, layer_collection


def FIM(model, loader, representation, variant="classif_logits", device=None, function=None,
        layer_collection=None, verbose=False, **kwargs):
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
        **kwargs: passed to the representation.
    """
    function, layer_collection = _prepare(model, device, function, layer_collection)
    generator = TorchHooksJacobianBackend(model, closed_form_function(function, variant),
                                          verbose=verbose)
    return representation(layer_collection=layer_collection, generator=generator, examples=loader,
                          **kwargs)


def FIM_MonteCarlo(model, loader, representation, variant="classif_logits", trials=1, device=None,
                   function=None, layer_collection=None, verbose=False, covariance=1.0, **kwargs):
    """The Fisher information matrix estimated with sampled targets.

    Computes ``F = (1/n) Σ_x (1/T) Σ_t ∇log p(y_t|x) ∇log p(y_t|x)ᵀ`` with ``y_t ~ p(·|x)``
    (``T = trials``); an unbiased estimate of :func:`FIM`, at the cost of ``trials`` backward
    directions instead of ``C - 1``.

    Variants: ``classif_logits`` (outputs are logits), ``classif_logsoftmax`` (outputs are
    log-probabilities), ``segmentation_logits`` (outputs ``(n, C, H, W)``: one label sampled per
    pixel, log-probabilities summed over pixels), ``regression`` (``y ~ N(f, covariance·I)``;
    returns the Fisher ``JᵀJ / covariance``, where upstream nngeometry returned
    ``covariance·JᵀJ``).
    """
    function, layer_collection = _prepare(model, device, function, layer_collection)
    generator = TorchHooksJacobianBackend(
        model, monte_carlo_function(function, variant, trials, covariance), verbose=verbose)
    return representation(layer_collection=layer_collection, generator=generator, examples=loader,
                          **kwargs)


def Jacobian(model, loader, layer_collection=None, function=None, device=None, verbose=False):
    """Per-example Jacobians of ``function`` (default: the model's outputs) as a PFMapDense of
    shape ``(n_output, n_examples, P)``; not normalized."""
    function, layer_collection = _prepare(model, device, function, layer_collection)
    generator = TorchHooksJacobianBackend(model, function, verbose=verbose)
    return PFMapDense(generator, examples=loader, layer_collection=layer_collection)


def GramMatrix(model, loader, layer_collection=None, function=None, device=None, verbose=False):
    """The Gram matrix of the per-example Jacobians (empirical NTK) as an FMatDense of shape
    ``(n_output, n, n_output, n)``; not normalized."""
    function, layer_collection = _prepare(model, device, function, layer_collection)
    generator = TorchHooksJacobianBackend(model, function, verbose=verbose)
    return FMatDense(layer_collection, generator, examples=loader)
