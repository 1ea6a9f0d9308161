"""Brute-force ground truth for tests: per-example Jacobians from torch.func, in the
collection's layout, and the dense matrices built from them."""
import torch
from torch.func import functional_call, jacrev, vmap

from nngeometry.layercollection import LayerCollection


def param_names(model, layer_collection):
    """Qualified parameter names in the collection's layout order."""
    names = []
    for lid, layer in layer_collection.layers.items():
        prefix = f"{lid}." if lid else ""
        names.extend(prefix + name for name in layer.param_names())
    return names


def per_example_jacobian(model, x, layer_collection=None, function=None):
    """``(n, K, P)``: the Jacobian of ``function(model, x_i)`` (default ``model(x_i)``) w.r.t.
    the collection's parameters, one example at a time (vmap over examples)."""
    lc = layer_collection or LayerCollection.from_model(model)
    names = param_names(model, lc)
    all_params = dict(model.named_parameters())
    params = {k: all_params[k].detach() for k in names}
    buffers = dict(model.named_buffers())

    def f(p, xi):
        out = functional_call(model, ({**all_params, **p}, buffers), (xi.unsqueeze(0),))
        if function is not None:
            out = function(out)
        return out.reshape(-1)

    J = vmap(jacrev(f), (None, 0))(params, x)
    n = x.shape[0]
    return torch.cat([J[k].reshape(n, J[k].shape[1], -1) for k in names], dim=2)


def multinomial_cov(logits):
    p = torch.softmax(logits, dim=1)
    return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


def fim_dense(model, x, variant="classif_logits", layer_collection=None):
    """The closed-form Fisher ``(1/n) Σ_x J_fᵀ Σ_{y|x} J_f`` from brute-force Jacobians."""
    J = per_example_jacobian(model, x, layer_collection)
    n = x.shape[0]
    with torch.no_grad():
        out = model(x).reshape(n, -1)
    if variant == "classif_logits":
        S = multinomial_cov(out)
    elif variant == "regression":
        S = torch.eye(out.shape[1], dtype=out.dtype).expand(n, -1, -1)
    elif variant == "classif_binary_logits":
        s = torch.sigmoid(out)
        S = (s * (1 - s)).unsqueeze(2)
    else:
        raise ValueError(variant)
    return torch.einsum("nkp,nkl,nlq->pq", J, S, J) / n
