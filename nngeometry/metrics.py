"""Entry points: Fisher information matrices, Hessians, Jacobians and Gram matrices of a model."""
from .backend import HessianBackend, TorchHooksJacobianBackend
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


def Hessian(model, loader, representation, loss_function=None, function=None,
            layer_collection=None, device=None, verbose=False, **kwargs):
    """The Hessian of the total loss, ``H = Σ_b ∇²_θ loss_function(function(*batch_b), *batch_b)``
    (a sum over the batches of the loader, not a mean), in the chosen representation.

    The default ``loss_function`` is the cross-entropy of the outputs against ``batch[1]``,
    summed over the examples (``reduction='sum'``): ``H`` is then the Hessian of
    ``Σ_x -log p(y|x)`` over the whole data set, i.e. ``n`` times the mean-loss Hessian (and
    equal to ``n · FIM(...)`` only where the Gauss-Newton approximation is exact). Unlike a
    Fisher matrix it contains the second derivatives of the network itself and may be
    indefinite.

    Built from Hessian-vector products (forward-over-reverse ``torch.func``): supported
    representations are ``PMatDense`` (``P`` HVPs per batch), ``PMatBlockDiag`` and ``PMatDiag``
    (exact diagonal blocks / diagonal, ``P`` HVPs per batch), ``PMatImplicit`` (one HVP per batch
    and product; its CG ``solve`` needs ``H + regul·I`` positive definite) and ``PMatMixed``
    groups of those. KFAC, EKFAC, LowRank and QuasiDiag approximate a Gauss-Newton matrix
    ``Σ JᵀJ`` and raise ``NotImplementedError``.

    Args:
        model: the ``torch.nn.Module``.
        loader: a DataLoader (or a single mini-batch) of ``(inputs, targets, ...)``.
        representation: a ``PMat*`` class (see above).
        loss_function: ``loss_function(outputs, *batch) -> scalar`` loss of a batch (use a
            summed reduction for the Hessian of the total loss).
        function: ``function(*batch) -> outputs`` given to ``loss_function``; default
            ``model(batch[0])``.
        layer_collection: the layers to differentiate; default all layers of the model (the
            other parameters are held constant).
        device: kept for compatibility; batches are moved to the model's device.
        verbose: show a progress bar.
        **kwargs: passed to the representation.
    """
    function, layer_collection = _prepare(model, device, function, layer_collection)
    generator = HessianBackend(model, loss_function=loss_function, function=function,
                               verbose=verbose)
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
