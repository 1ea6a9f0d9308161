"""The engine's checks on what the model computes: is it deterministic, and are the numbers
finite.

Random models are refused: dropout modules in training mode (`refuse_random_modules`), and
forwards that draw from the global RNG (watched with `_rng_state` / `_same_rng`) and give other
outputs when run again on a forked RNG (`probe_deterministic` for a pass with hooks,
`probe_functional` for an implicit product). Non-finite statistics and products are refused
with the layers they come from (`check_statistic`, `_check_product`).
"""
import functools

import torch
from torch import nn

from .batches import all_finite
from .model_state import _no_fused_attention
from ..layer_types.base import recording_paused


def random_in_vmap_explained(method):
    """Products vmapped over many vectors (``torch.func.vmap``) refuse a forward that draws
    random numbers with torch's own message about vmap's randomness flags; say what it means
    for the user's model instead."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except RuntimeError as e:
            if "randomness error mode" not in str(e):
                raise
            raise RuntimeError(
                "the function is not deterministic: its forward draws random numbers (a "
                "dropout module in training mode, F.dropout(x, p, training=True), or torch.rand "
                "/ torch.randn noise in forward), which makes every matrix random. Call "
                "model.eval(), make that randomness follow the module's mode "
                "(F.dropout(x, p, training=self.training), or nn.Dropout)") from e
    return wrapper


def _refuse_inference_parameters(tensors):
    """Parameters created inside ``torch.inference_mode()`` can't take part in autograd."""
    for name, t in tensors.items():
        if torch.is_inference(t):
            raise RuntimeError(
                f"the model's parameter '{name}' is an inference tensor (the model was created "
                "or loaded inside torch.inference_mode()): autograd, which the implicit products "
                "need, can't use it. Create or load the model outside inference mode, or clone "
                "its parameters outside it")


def _flat(v):
    """The flat ``(P,)`` tensor of a PVector or a tensor."""
    return v.get_flat_representation() if hasattr(v, "get_flat_representation") else v


_BACKWARD_NONFINITE = (
    "although the model's outputs are finite: a gradient became NaN or Inf in the backward "
    "pass, at an operation that is not differentiable where it is evaluated (e.g. "
    "torch.sqrt(h * h) or h.abs() ** 0.5 at h = 0, torch.where whose unused branch has an "
    "infinite gradient) or that overflows. Find it with "
    "torch.autograd.set_detect_anomaly(True) on a backward pass of the model, and make it "
    "differentiable there (e.g. torch.sqrt(h * h + eps))")


def _nonfinite_layers(result, layer_collection):
    """The ids of the layers whose part of ``result`` (a tensor whose last dimension is the
    collection's ``P``, or a dict keyed by layer id) holds a NaN or an Inf."""
    if isinstance(result, dict):
        bad = []
        for lid, part in result.items():
            if any(not bool(torch.isfinite(t).all()) for t in _tensor_leaves(part)):
                bad.append(lid)
        return bad
    if torch.is_tensor(result) and result.dim() and \
            result.shape[-1] == layer_collection.numel():
        P = result.shape[-1]
        # a dense (P, P) matrix: a layer's bad gradients also spoil its rows in the other
        # layers' columns; its diagonal says whose they are
        part = torch.diagonal(result) if result.shape == (P, P) else result
        ok = torch.isfinite(part).reshape(-1, P).all(dim=0)
        return [lid for lid in layer_collection.layer_ids()
                if not bool(ok[layer_collection.slice(lid)].all())]
    return []


def _tensor_leaves(obj):
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensor_leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensor_leaves(v)]
    return []


def check_statistic(result, layer_collection):
    """``ValueError`` naming the layers if the statistic ``result`` of a pass (whose outputs
    were checked finite) holds a NaN or an Inf: checked once per pass, one host
    synchronisation on an accelerator."""
    leaves = [t for t in _tensor_leaves(result) if t.is_floating_point() and t.numel()]
    if not leaves:
        return
    if leaves[0].device.type == "cpu":
        ok = all(all_finite(t) for t in leaves)
    else:
        ok = bool(torch.stack([torch.isfinite(t).all() for t in leaves]).all())
    if ok:
        return
    lids = _nonfinite_layers(result, layer_collection)
    where = f" of layer(s) {', '.join(repr(lid) for lid in lids)}" if lids else ""
    raise ValueError(f"the statistics{where} contain NaN or Inf " + _BACKWARD_NONFINITE)


def _check_product(out, inp, what):
    """``ValueError`` if an implicit product ``out`` holds a NaN or an Inf (one check per
    product, i.e. per pass over the examples)."""
    if not torch.is_tensor(out) or not out.is_floating_point() or all_finite(out):
        return
    t = _flat(inp) if hasattr(inp, "get_flat_representation") else inp
    if torch.is_tensor(t) and t.is_floating_point() and not all_finite(t):
        raise ValueError(f"{what}: the vector multiplied contains NaN or Inf")
    raise ValueError(f"{what}: the product contains NaN or Inf " + _BACKWARD_NONFINITE)


def _rng_state(device):
    """The global RNG state that a forward on ``device`` draws from: the CPU generator's, and
    the device's generator's for an accelerator."""
    state = [torch.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device))
    return state


def _same_rng(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _random_outside_modules(diff, scale):
    return (
        f"the function is not deterministic: run twice on the same batch its outputs differ by "
        f"up to {diff:.3g} (largest output {scale:.3g}), and every module is in eval mode: the "
        "forward draws from the global random number generator outside a module's training "
        "mode (e.g. F.dropout(x, p, training=True), or noise from torch.rand / torch.randn in "
        "forward), which makes every matrix random. Make that randomness follow the module's "
        "mode (F.dropout(x, p, training=self.training), or nn.Dropout), or pass "
        "check_deterministic=False if the randomness is intended")


def first_random_module(model):
    """``(name, module, p)`` of the first module of ``model`` that draws random numbers in its
    forward (a dropout module, ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
    ``FeatureAlphaDropout``, or an ``nn.MultiheadAttention`` with ``dropout > 0``, in training
    mode), or None. ``name`` is its qualified name (its class name for the model itself)."""
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            p = module.p
        elif isinstance(module, nn.MultiheadAttention):
            p = module.dropout
        else:
            continue
        if p > 0:
            return name or type(module).__name__, module, p
    return None


def refuse_random_modules(model):
    """``RuntimeError`` naming the first module of ``model`` that draws random numbers in its
    forward (see `first_random_module`). Such a model gives a random matrix at each call,
    whose mean is not the matrix of the model used for prediction (in eval mode)."""
    found = first_random_module(model)
    if found is not None:
        name, module, p = found
        raise RuntimeError(
            f"module '{name}' ({type(module).__name__}, p={p}) is "
            "in training mode: its forward is random, so the matrix would be a random one "
            "(per-example quantities need a deterministic forward). Call model.eval() before "
            "computing the matrix, or pass check_deterministic=False if this is intended")


def probe_deterministic(function, model, device, batch, raw, rng_consumed=False):
    """``RuntimeError`` if the model part of ``function`` (the generator's: a function of the
    batch, or an output transform) gives other outputs than ``raw`` on ``batch`` when run again
    (without gradients, hooks paused). The probe runs on a forked RNG (the CPU's and the
    ``device``'s when it is a CUDA device): the global RNG state is as if it had not run, and a
    random model draws other numbers than in the first run."""
    fn = function
    fn = fn.function if hasattr(fn, "model_outputs") and hasattr(fn, "split") else fn
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), recording_paused(), \
            _no_fused_attention():
        again = fn(*batch)
    if not isinstance(again, torch.Tensor) or again.shape != raw.shape:
        shape = tuple(again.shape) if isinstance(again, torch.Tensor) else type(again).__name__
        raise RuntimeError(
            f"the function is not deterministic: run twice on the same batch it returned "
            f"outputs of shape {tuple(raw.shape)}, then {shape}. Call model.eval(), or pass "
            "check_deterministic=False if this is intended")
    ref = raw.detach()
    if not ref.is_floating_point() or ref.numel() == 0:
        return
    # the second run differs by round-off only where kernels differ between grad and
    # no-grad modes: a tolerance of a few dozen ulps of the largest output
    tol = 64 * torch.finfo(ref.dtype).eps
    diff = (again - ref).abs().max().item()
    scale = ref.abs().max().item()
    if not diff <= tol * max(scale, torch.finfo(ref.dtype).tiny):
        if rng_consumed and not any(m.training for m in model.modules()):
            raise RuntimeError(_random_outside_modules(diff, scale))
        raise RuntimeError(
            f"the function is not deterministic: run twice on the same batch its outputs "
            f"differ by up to {diff:.3g} (largest output {scale:.3g}); a random layer "
            "(dropout or another stochastic module in training mode?) makes every matrix "
            "random. Call model.eval() before computing the matrix, or pass "
            "check_deterministic=False if the randomness is intended")


def probe_functional(model, f, params, device):
    """``RuntimeError`` if ``f(params)`` (the forward of an implicit product) gives other
    outputs when run twice (on a forked RNG: the global state is left as it was)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), _no_fused_attention():
        a, b = f(params), f(params)
    if not torch.is_floating_point(a) or a.numel() == 0:
        return
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    if not diff <= 64 * torch.finfo(a.dtype).eps * max(scale, torch.finfo(a.dtype).tiny):
        if any(m.training for m in model.modules()):
            raise RuntimeError(
                f"the function is not deterministic: run twice on the same batch its "
                f"outputs differ by up to {diff:.3g} (largest output {scale:.3g}); a random "
                "layer in training mode makes every product random. Call model.eval(), or "
                "pass check_deterministic=False if the randomness is intended")
        raise RuntimeError(_random_outside_modules(diff, scale))
