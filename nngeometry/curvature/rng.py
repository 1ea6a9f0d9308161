"""A counter-based random number generator for seeded Monte-Carlo matrices.

`batch_key` hashes a seed, a batch's index in the loader and its content into a 63-bit key;
`counter_uniform` maps the key and the counters ``1, 2, ...`` through SplitMix64 to uniform
numbers in ``(0, 1)``. No RNG state is read or advanced: the same key gives the same numbers
on every call, device and ``torch.func`` transform, so a seeded Monte-Carlo Fisher
``(1/n) Σ_x J_g(x)ᵀ J_g(x)`` is one fixed matrix across passes over the data.
"""
import hashlib

import torch


def _tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in obj:
            yield from _tensors_in(obj[k])
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors_in(v)


def batch_key(seed, batch, index=None):
    """A 63-bit integer, a fixed function of ``seed``, the batch's ``index`` in the loader and the
    bytes, dtypes and shapes of its tensors (hashed with BLAKE2b). Computed on real tensors
    (the generator calls it outside ``torch.func`` transforms)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((int(seed), index)).encode())
    for t in _tensors_in(batch):
        h.update(repr((str(t.dtype), tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _signed64(c):
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shr(z, s):
    """Logical right shift of int64 ``z`` (``>>`` is arithmetic on signed tensors)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def counter_uniform(key, shape, dtype, device):
    """Uniform numbers in ``(0, 1)`` of ``shape``: SplitMix64 (Steele et al. 2014) of the
    counters ``key·φ + 1, 2, ...``, top 53 bits. Plain integer arithmetic, no RNG state: the
    same numbers on every call, device and ``torch.func`` transform (``vmap`` refuses random
    ops), which is what makes a seeded Monte-Carlo matrix one fixed matrix."""
    numel = 1
    for d in shape:
        numel *= d
    z = torch.arange(1, numel + 1, dtype=torch.int64, device=device) * _GOLDEN
    z = z + _signed64(((key * 0x2545F4914F6CDD1D) + 0x632BE59BD9B4E019) % (1 << 64))
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    u = (_shr(z, 11).to(torch.float64) + 0.5) * 2.0 ** -53
    return u.to(dtype).clamp_(min=torch.finfo(dtype).tiny, max=1 - torch.finfo(dtype).eps / 2)\
        .reshape(shape)
