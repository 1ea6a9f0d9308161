"""Per-example output Hessians of any loss and their square roots.

`output_hessians` gives ``H_i = ∇²_f ℓ_i`` ``(n, D, D)``, the Hessian of example ``i``'s loss
w.r.t. its own ``D`` outputs (plain autograd, or ``torch.func`` inside a transform);
`psd_sqrt` gives ``S_i`` with ``S_i S_iᵀ = H_i`` (``S = V Λ^{1/2}`` from ``H = V Λ Vᵀ``),
refusing a loss that is not convex in the outputs. The generalized Gauss-Newton matrix of a
loss without a closed form is built from them.
"""
import torch

from .losses import per_example_losses


def _vmap_dims(targets, n):
    return tuple(0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else None
                 for t in targets)


def output_hessians(loss_function, outputs, targets, positions="sum"):
    """``(n, D, D)``: ``H_i = ∇²_f ℓ_i``, the Hessian of example ``i``'s loss w.r.t. its own
    outputs (flattened, ``D`` entries), by ``torch.func.hessian`` vmapped over the examples
    (a loss that ``vmap`` cannot batch is run example by example). The loss is
    ``loss_function(f_i[None], *targets_i[None])`` reduced as `per_example_losses`."""
    n = outputs.shape[0]
    f = outputs.detach()
    shape = f.shape[1:]
    try:
        H = _output_hessians_autograd(loss_function, f, targets, positions)
        if H is not None:
            return H
    except RuntimeError:
        pass  # inside a torch.func transform (implicit products): the functional form below

    def one(fi, *ti):
        ti = tuple(t.unsqueeze(0) if isinstance(t, torch.Tensor) and d == 0 else t
                   for t, d in zip(ti, dims))
        return per_example_losses(loss_function(fi.unsqueeze(0), *ti), 1, positions).sum()

    dims = _vmap_dims(targets, n)
    # reverse-over-reverse (torch.func.hessian is forward-over-reverse: the implicit products
    # already run inside a forward-mode level, which cannot be nested)
    hess = torch.func.jacrev(torch.func.jacrev(one))
    try:
        H = torch.func.vmap(hess, in_dims=(0,) + dims)(f, *targets)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        if "must return one loss per example" in str(e):
            raise
        # ops without a batching rule (or .item() in the loss): one example at a time
        dims = tuple(None for _ in targets)
        H = torch.stack([
            hess(f[i], *[t[i:i + 1] if d0 == 0 else t for t, d0 in
                         zip(targets, _vmap_dims(targets, n))])
            for i in range(n)]) if n else f.new_zeros((0,) + shape + shape)
    D = shape.numel()
    return H.reshape(n, D, D)


def _output_hessians_autograd(loss_function, f, targets, positions):
    """`output_hessians` by plain autograd (5-50x faster than ``torch.func`` on small
    outputs): the per-example losses depend on their own outputs only, so the gradient of
    their sum w.r.t. ``f`` holds every example's gradient, and one backward per output
    coordinate (batched) gives row ``d`` of every ``H_i``. None when the loss does not
    support double backward."""
    from ..backend.strategy import _grad  # (the backend imports this package)

    n = f.shape[0]
    D = f[0].numel() if n else f.shape[1:].numel()
    flat = f.reshape(n, D).clone().requires_grad_(True)
    with torch.enable_grad():
        losses = per_example_losses(loss_function(flat.reshape(f.shape), *targets), n,
                                    positions)
        (g,) = torch.autograd.grad(losses.sum(), flat, create_graph=True)
        if not g.requires_grad:  # a loss linear in the outputs: H = 0
            return flat.new_zeros(n, D, D)
        eye = torch.eye(D, dtype=f.dtype, device=f.device).unsqueeze(1).expand(D, n, D)
        try:
            (rows,) = _grad(g, [flat], eye, is_grads_batched=True, allow_unused=True)
        except RuntimeError:
            rows = torch.stack([_grad(g, [flat], eye[d], retain_graph=True,
                                      allow_unused=True)[0]
                                for d in range(D)])
    if rows is None:
        return flat.new_zeros(n, D, D)
    return rows.transpose(0, 1).detach()  # (n, D, D): H[i, d, :] = ∂g_{i,d}/∂f_i


def psd_sqrt(H, loss_name="the loss"):
    """``S`` with ``S Sᵀ = H`` for a batch of symmetric PSD matrices ``H`` (``(n, D, D)``), from
    their eigendecompositions ``H = V Λ Vᵀ``: ``S = V Λ^{1/2}``. Eigenvalues below zero by more
    than round-off are refused (``ValueError``): the Gauss-Newton matrix needs a loss convex in
    the outputs."""
    H = 0.5 * (H + H.transpose(1, 2))
    lam, V = torch.linalg.eigh(H)
    if lam.numel():
        top = lam.abs().amax(dim=1)
        tol = 100 * H.shape[1] * torch.finfo(H.dtype).eps * top + torch.finfo(H.dtype).tiny
        worst = (lam[:, 0] + tol)
        if bool((worst < 0).any()):
            i = int(torch.argmin(lam[:, 0] / top.clamp_min(torch.finfo(H.dtype).tiny)))
            raise ValueError(
                f"{loss_name} is not convex in the outputs: the Hessian of example {i}'s loss w.r.t. "
                f"its outputs has the eigenvalue {float(lam[i, 0]):.3g} (largest "
                f"{float(lam[i, -1]):.3g}). The generalized Gauss-Newton matrix J^T H J needs a "
                "positive semi-definite H (a loss convex in the outputs: cross-entropy, (weighted) "
                "MSE, Gaussian/Poisson negative log-likelihood in the natural parameter...); for "
                "this loss use Hessian(...) or EmpiricalFisher(...)")
    S = V * lam.clamp_min(0).sqrt().unsqueeze(1)
    # directions whose eigenvalue is zero for every example (the softmax's constant direction:
    # cross-entropy has rank C - 1) contribute nothing: dropped, one backward direction less
    if lam.numel():
        # (below eigh's own error, D·eps·top, an eigenvalue is round-off)
        null = 4 * H.shape[1] * torch.finfo(H.dtype).eps * top + torch.finfo(H.dtype).tiny
        keep = (lam > null.unsqueeze(1)).any(dim=0)
        if not bool(keep.all()) and bool(keep.any()):
            S = S[:, :, keep]
    return S
