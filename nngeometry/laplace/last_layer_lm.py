"""Last-layer Laplace approximation of a language model, without a backward pass.

The examples are the token positions that predict a token (causal language models: the
logits at position ``t`` predict label ``t + 1``; positions whose target is ``-100`` or
padding, ``attention_mask == 0``, do not count: the language-model convention of the curvature
entry points, each position weighing 1). With ``x̃_i`` the
input of the output layer ``f = W x + b`` at position ``i`` (``[x_i, 1]`` with a bias, ``D``
entries), ``p_i = softmax(f_i)`` over the ``V`` tokens and ``Λ_i = diag(p_i) − p_i p_iᵀ`` the
output Hessian of the cross-entropy, the layer's GGN over the ``n`` counted positions is

```
M = (1/n) Σ_i Λ_i ⊗ x̃_i x̃_iᵀ            (Kronecker layout: index (c, j) = c·D + j)
```

and the posterior precision ``H = (n/T) M + λ I``. ``Λ_i`` is never formed: every form below is
built from the features ``x̃_i`` and the probabilities ``p_i`` only, in chunks of positions.

* **Diag**: ``M_cj = (1/n) Σ_i (p_ic − p_ic²) x̃_ij²``, a ``(V, D)`` matrix product.
* **KFAC**: ``M ≈ G ⊗ A`` with ``A = (1/n) Σ_i x̃_i x̃_iᵀ`` (``D × D``) and the output factor
  ``G = (1/n) Σ_i Λ_i = diag(p̄) − B Bᵀ``, ``p̄`` the mean probabilities and ``B Bᵀ = (1/n) Σ_i
  p_i p_iᵀ``: a diagonal minus a low-rank term, never a dense ``V × V`` matrix when ``V`` is large.
  In ``A``'s eigenbasis (``a_k``) ``H`` is block diagonal with blocks
  ``s a_k G + λ I = D_k − s a_k B Bᵀ``, ``D_k = s a_k diag(p̄) + λ I``, ``s = n/T``: its
  ``log det`` by the matrix determinant lemma, its inverse by Woodbury, exactly (exact damping),
  at ``O(D · V · r²)`` with ``r`` the columns of ``B``. Exactly, ``r = min(n, V)`` (``B = Pᵀ/√n``,
  or the eigendecomposition of ``PᵀP/n`` when ``n > V``); ``output_rank=k`` replaces ``B Bᵀ``
  by its rank-``k`` Nyström approximation from one sketch ``(1/n) Σ_i p_i (p_iᵀ Ω)`` (``Ω`` a
  ``V × k`` Gaussian): the Nyström term is below ``B Bᵀ`` in the positive semi-definite order,
  so the approximate ``G`` stays positive semi-definite (and ``log det H`` is not below the exact
  one).
* **Dense** (small layers only): ``M`` itself, ``(VD) × (VD)``.

The predictive is the GLM's in closed form, never through a Jacobian: ``f* = W x̃*`` has
``Var(f*) = J* H⁻¹ J*ᵀ`` with ``J* = I_V ⊗ x̃*ᵀ``, i.e. ``Σ_k z_k² (s a_k G + λ I)⁻¹`` for KFAC
(``z = U_Aᵀ x̃*``): its diagonal and its row sums (the Laplace bridge's) are ``z²`` times the
``(D, V)`` diagonals and row sums of the blocks' inverses, computed once; for Diag
``Var(f*_c) = Σ_j x̃*_j² / H_cj``.
"""
import math
from collections.abc import Mapping

import torch

from .._bridge import _bridge_from_parts
from .._entry import resolve_representation
from ..backend.model_and_data import iterate_batches
from ..curvature import LMConvention, is_causal_lm, lm_positions

_FORMS = {"PMatKFAC": "kfac", "PMatDiag": "diag", "PMatDense": "dense"}
_LINKS = ("probit", "bridge", "bridge_norm", "mc")


class LastLayerLMLaplace:
    """Last-layer Laplace ``N(θ*, H⁻¹)`` of a language model's output layer, the token
    positions being the examples (see the module docstring for the maths).

    Args:
        model: the trained language model, e.g. a Hugging Face ``GPT2LMHeadModel``: its output
            layer is ``model.get_output_embeddings()`` and its features (the output layer's
            inputs) ``model.base_model(**inputs).last_hidden_state``; other models pass
            ``head=`` and ``features=``.
        representation: ``PMatKFAC`` (default), ``PMatDiag`` or ``PMatDense`` (small layers
            only), or its name (``'kfac'``, ``'diag'``, ``'dense'``).
        prior_precision: ``λ``, a positive scalar (one precision for the layer).
        prior_mean: ``m`` of the prior ``N(m, λ⁻¹ I)``: a scalar or a 1-D tensor of length
            ``P`` in the flat layout (the weight row-major ``(V, d)``, then the bias).
        temperature: ``T``.
        output_rank: KFAC only: ``None`` (default) keeps the output factor exact; an integer
            ``k`` uses the rank-``k`` Nyström approximation of its low-rank term (for a
            vocabulary, where the exact term has ``min(n, V)`` columns).
        head: the output layer, an ``nn.Linear`` ``d → V`` (default
            ``model.get_output_embeddings()``).
        features: ``features(batch) -> (n, T, d)``, the head's inputs at every position of a
            batch (default: ``model.base_model(**inputs).last_hidden_state``, the inputs being
            the batch's keys but the labels).
        causal_lm: ``True`` for the causal convention (shifted labels), ``False`` for position
            ``t`` predicting label ``t`` (masked language models, token classifiers); ``None``
            detects a causal LM (Hugging Face's ``*ForCausalLM`` / ``*LMHeadModel``).
        target_key: the labels' key in dict batches.
        chunk_size: positions per chunk of the head (bounds the ``(chunk, V)`` buffers).
        seed: the seed of the Nyström sketch.

    Batches are dicts ``{'input_ids', 'attention_mask', 'labels'}`` (or a bare ``input_ids``
    tensor for the predictive). The parameters ``θ`` are the head's weight (and bias): the
    features are held fixed at ``θ*`` (with tied input embeddings, only the output side is
    treated as uncertain, as every last-layer Laplace does).
    """

    def __init__(self, model, representation="kfac", prior_precision=1.0, prior_mean=0.0,
                 temperature=1.0, output_rank=None, head=None, features=None, causal_lm=None,
                 target_key="labels", chunk_size=512, seed=0):
        rep = resolve_representation(representation, "LastLayerLMLaplace")
        if getattr(rep, "__name__", None) not in _FORMS:
            raise ValueError(f"LastLayerLMLaplace: representation {rep!r} is not supported: use "
                             "PMatKFAC, PMatDiag or PMatDense ('kfac', 'diag', 'dense')")
        self.form = _FORMS[rep.__name__]
        self.representation = rep
        if output_rank is not None and (self.form != "kfac" or int(output_rank) < 1):
            raise ValueError("output_rank= is the rank of KFAC's output factor's low-rank term: "
                             "a positive integer, with representation PMatKFAC")
        self.output_rank = None if output_rank is None else int(output_rank)
        self.model = model
        self.target_key = target_key
        if head is None:
            get = getattr(model, "get_output_embeddings", None)
            head = get() if get is not None else None
        if not isinstance(head, torch.nn.Linear):
            raise ValueError("LastLayerLMLaplace needs the output layer as an nn.Linear: pass "
                             "head= (and features=) for a model without get_output_embeddings()")
        self.head = head
        if features is None:
            body = getattr(model, "base_model", None)
            if body is None or body is model:
                raise ValueError("LastLayerLMLaplace: the model has no base_model giving the "
                                 "head's inputs: pass features=lambda batch: hidden states "
                                 "(n, T, d)")
            features = self._body_features(body)
        self.features = features
        if causal_lm is None:
            if not is_causal_lm(model):
                raise ValueError("LastLayerLMLaplace: the model is not detected as a causal "
                                 "language model: pass causal_lm=True (labels shifted) or False")
            causal_lm = True
        self.convention = LMConvention(causal_lm, target_key)
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)
        self.seed = int(seed)
        self.n = 0
        self.loss = None
        self._cache = {}

    # ------------------------------------------------------------------ layout
    @property
    def has_bias(self):
        return self.head.bias is not None

    @property
    def n_params(self):
        V, d = self.head.weight.shape
        return V * (d + int(self.has_bias))

    def _theta_kron(self):
        """``θ*`` as ``(V, D)``: row ``c`` is ``[W_c, b_c]``."""
        W = self.head.weight.detach()
        if self.has_bias:
            W = torch.cat([W, self.head.bias.detach()[:, None]], dim=1)
        return W

    def _flat_to_kron(self):
        """``perm`` with ``flat[f] = kron[perm[f]]`` (flat: ``W`` row-major, then ``b``)."""
        V, d = self.head.weight.shape
        D = d + int(self.has_bias)
        idx = torch.arange(V * D).reshape(V, D)
        perm = idx[:, :d].reshape(-1)
        if self.has_bias:
            perm = torch.cat([perm, idx[:, d]])
        return perm

    # ------------------------------------------------------------------ data
    def _body_features(self, body):
        key = self.target_key

        def features(batch):
            inputs = {k: v for k, v in batch.items() if k != key}
            return body(**inputs).last_hidden_state
        return features

    def _as_batch(self, batch):
        if isinstance(batch, (tuple, list)) and len(batch) == 1:
            batch = batch[0]
        if torch.is_tensor(batch):
            return {"input_ids": batch}
        if not isinstance(batch, Mapping):
            raise TypeError("LastLayerLMLaplace reads dict batches {'input_ids', "
                            "'attention_mask', 'labels'} (or an input_ids tensor for the "
                            f"predictive), got {type(batch).__name__}")
        return batch

    def _positions(self, batch, need_labels):
        """``(X, y)``: the features ``(m, D)`` (with the bias's 1) and labels ``(m,)`` of the
        batch's counted positions."""
        if need_labels and self.target_key not in batch:
            raise ValueError(f"LastLayerLMLaplace.fit needs the labels: the batch has no key "
                             f"{self.target_key!r} (its keys: {', '.join(map(repr, batch))})")
        h = self.features(batch)
        if h.dim() != 3:
            raise ValueError(f"the features must be (n, T, d), got shape {tuple(h.shape)}")
        fp, y, w = lm_positions(h, (batch,), self.convention, positions="sum")
        keep = w > 0
        X = fp[keep]
        if self.has_bias:
            X = torch.cat([X, torch.ones_like(X[:, :1])], dim=1)
        return X, (None if y is None else y[keep])

    def _logits(self, X):
        W = self._theta_kron()
        return X.to(W.dtype) @ W.T

    # ------------------------------------------------------------------ fitting
    def fit(self, loader):
        """One pass over ``loader`` (dict batches with labels) under ``no_grad``: the data term
        ``Σ_i −log p_i[y_i]`` and the chosen form of ``M`` over the counted positions."""
        V, D = self._theta_kron().shape
        W = self._theta_kron()
        dt, dev = W.dtype, W.device
        n, loss = 0, torch.zeros((), dtype=dt, device=dev)
        diag = A = pbar = dense = None
        rows, gram, sketch, omega = [], None, None, None
        if self.form == "diag":
            diag = torch.zeros(V, D, dtype=dt, device=dev)
        elif self.form == "dense":
            dense = torch.zeros(V * D, V * D, dtype=dt, device=dev)
        else:
            A = torch.zeros(D, D, dtype=dt, device=dev)
            pbar = torch.zeros(V, dtype=dt, device=dev)
            if self.output_rank is not None:
                g = torch.Generator(device="cpu").manual_seed(self.seed)
                omega = torch.randn(V, self.output_rank, generator=g, dtype=dt).to(dev)
                sketch = torch.zeros(V, self.output_rank, dtype=dt, device=dev)
        with torch.no_grad():
            for batch in iterate_batches(loader):
                batch = self._as_batch(batch)
                X, y = self._positions(batch, need_labels=True)
                X = X.to(dt)
                for i in range(0, X.shape[0], self.chunk_size):
                    x, t = X[i:i + self.chunk_size], y[i:i + self.chunk_size]
                    logp = torch.log_softmax(x @ W.T, dim=-1)
                    loss -= logp.gather(1, t[:, None]).sum()
                    p = logp.exp_()
                    n += x.shape[0]
                    if diag is not None:
                        diag += (p - p * p).T @ (x * x)
                    elif dense is not None:
                        px = (p[:, :, None] * x[:, None, :]).reshape(len(p), -1)
                        first = torch.einsum("ic,ij,ik->cjk", p, x, x)
                        dense -= px.T @ px
                        d4 = dense.view(V, D, V, D)
                        d4[torch.arange(V), :, torch.arange(V), :] += first
                    else:
                        A += x.T @ x
                        pbar += p.sum(0)
                        if sketch is not None:
                            sketch += p.T @ (p @ omega)
                        elif gram is not None:
                            gram += p.T @ p
                        else:
                            rows.append(p.clone())
                            if sum(len(r) for r in rows) > V:
                                # more positions than tokens: the V × V Gram is the smaller
                                P = torch.cat(rows)
                                gram, rows = P.T @ P, []
        if n == 0:
            raise ValueError("the loader gave no counted position (labels all -100 or padding?)")
        self.n, self.loss, self._cache = n, loss, {}
        self.theta_map = self._theta_kron().clone()
        if diag is not None:
            self.M = diag / n
        elif dense is not None:
            self.M = dense / n
        else:
            self.A, self.pbar = A / n, pbar / n
            self.B = self._low_rank(rows, gram, sketch, omega, n)
            a, UA = torch.linalg.eigh(self.A)
            self.a, self.UA = a.clamp_min(0), UA
        return self

    @staticmethod
    def _low_rank(rows, gram, sketch, omega, n):
        """``B`` with ``B Bᵀ = (1/n) Σ_i p_i p_iᵀ`` (or its Nyström approximation)."""
        if sketch is not None:
            Y = sketch / n
            nu = torch.finfo(Y.dtype).eps * torch.linalg.matrix_norm(Y)
            Yn = Y + nu * omega
            L = torch.linalg.cholesky(omega.T @ Yn)
            Bn = torch.linalg.solve_triangular(L, Yn.T, upper=False).T  # Yn L⁻ᵀ
            U, S, _ = torch.linalg.svd(Bn, full_matrices=False)
            return U * (S ** 2 - nu).clamp_min(0).sqrt()
        if gram is not None:
            w, Q = torch.linalg.eigh(gram / n)
            return Q * w.clamp_min(0).sqrt()
        return torch.cat(rows).T / math.sqrt(n)

    def _check_fitted(self):
        if not self.n:
            raise RuntimeError("call fit(loader) first")

    # ------------------------------------------------------------------ the prior
    def _lam(self, prior_precision=None):
        lam = self.prior_precision if prior_precision is None else prior_precision
        if torch.is_tensor(lam):
            if lam.numel() != 1:
                raise ValueError("LastLayerLMLaplace takes one prior precision (a scalar) for the "
                                 f"layer, got {lam.numel()} values")
            lam = lam.reshape(()).to(self.theta_map.dtype)
        elif isinstance(lam, (dict, list, tuple)):
            raise ValueError("LastLayerLMLaplace takes one prior precision (a scalar)")
        value = float(lam.detach()) if torch.is_tensor(lam) else float(lam)
        if value <= 0:
            raise ValueError(f"the prior precision must be positive, got {value}")
        return lam

    def _prior_mean_kron(self):
        m = self.prior_mean
        if torch.is_tensor(m) and m.numel() > 1:
            if m.dim() != 1 or m.numel() != self.n_params:
                raise ValueError(f"prior_mean has shape {tuple(m.shape)}: give a scalar or a 1-D "
                                 f"tensor of length P = {self.n_params}")
            out = torch.empty_like(m)
            out[self._flat_to_kron().to(m.device)] = m
            return out.reshape(self.theta_map.shape).to(self.theta_map.dtype)
        return float(m) if not torch.is_tensor(m) else m.reshape(()).to(self.theta_map.dtype)

    # ------------------------------------------------------------------ KFAC blocks
    def _kfac_chunks(self):
        # blocks of 2^24 entries (64 MiB in float32): above glibc's largest mmap threshold, so
        # each is returned to the system when freed instead of fragmenting the heap
        V, r = self.B.shape
        return max(1, int(2 ** 24 // max(V * max(r, 1), 1)))

    def _kfac_logdet(self, lam, s):
        """``Σ_k log det(D_k − c_k B Bᵀ)``, ``c_k = s a_k``, ``D_k = c_k p̄ + λ``."""
        total = 0.0
        B, step = self.B, self._kfac_chunks()
        eye = torch.eye(B.shape[1], dtype=B.dtype, device=B.device)
        for i in range(0, len(self.a), step):
            c = s * self.a[i:i + step]
            Dk = c[:, None] * self.pbar[None, :] + lam  # (k, V)
            K = torch.einsum("vr,kv,vq->krq", B, 1.0 / Dk, B)
            Mk = eye - c[:, None, None] * K
            total = total + torch.log(Dk).sum() + 2 * torch.log(
                torch.diagonal(torch.linalg.cholesky(Mk), dim1=-2, dim2=-1)).sum()
        return total

    def _kfac_inverse_parts(self, lam, s):
        """The diagonals and row sums of ``(s a_k G + λ I)⁻¹``, two ``(D, V)`` tensors."""
        key = ("kfac", float(lam), float(s))
        if key in self._cache:
            return self._cache[key]
        B, step = self.B, self._kfac_chunks()
        eye = torch.eye(B.shape[1], dtype=B.dtype, device=B.device)
        # written in place: no small result kept between the blocks' large temporaries
        diags = torch.empty(len(self.a), B.shape[0], dtype=B.dtype, device=B.device)
        rows = torch.empty_like(diags)
        for i in range(0, len(self.a), step):
            c = s * self.a[i:i + step]
            Dk = c[:, None] * self.pbar[None, :] + lam
            E = B[None] / Dk[..., None]  # D_k⁻¹ B, (k, V, r)
            Mk = eye - c[:, None, None] * torch.einsum("vr,kvq->krq", B, E)
            L = torch.linalg.cholesky(Mk)
            # the inverse is D_k⁻¹ + c_k E M_k⁻¹ Eᵀ = D_k⁻¹ + c_k Fᵀ F with F = L⁻¹ Eᵀ (one
            # triangular solve): its diagonal is c_k ||F_v||², its row sums c_k Fᵀ (F 1)
            F = torch.linalg.solve_triangular(L, E.transpose(1, 2), upper=False)  # (k, r, V)
            diags[i:i + step] = 1.0 / Dk + c[:, None] * (F * F).sum(1)
            rows[i:i + step] = 1.0 / Dk + c[:, None] * torch.einsum("krv,kr->kv", F, F.sum(-1))
        out = (diags, rows)
        self._cache = {key: out}
        return out

    # ------------------------------------------------------------------ the evidence
    def _scale(self):
        return self.n / self.temperature

    def posterior_precision_logdet(self, prior_precision=None):
        """``log det H`` (differentiable in a tensor ``prior_precision``)."""
        self._check_fitted()
        lam, s = self._lam(prior_precision), self._scale()
        if self.form == "diag":
            return torch.log(s * self.M + lam).sum()
        if self.form == "dense":
            H = s * self.M + lam * torch.eye(self.M.shape[0], dtype=self.M.dtype,
                                             device=self.M.device)
            return torch.linalg.slogdet(H)[1]
        return self._kfac_logdet(lam, s)

    def log_marginal_likelihood(self, prior_precision=None):
        """``log p(D) ≈ −(1/T) Σ_i CE_i − ½ λ ||θ* − m||² − ½ (log det H − P log λ)``, the sum
        over the counted positions; differentiable in a tensor ``prior_precision``."""
        self._check_fitted()
        lam = self._lam(prior_precision)
        scatter = ((self.theta_map - self._prior_mean_kron()) ** 2).sum()
        logdet_prior = self.n_params * (torch.log(lam) if torch.is_tensor(lam) else math.log(lam))
        return (-self.loss / self.temperature - 0.5 * lam * scatter
                - 0.5 * (self.posterior_precision_logdet(lam) - logdet_prior))

    def optimize_prior_precision(self, method="marglik", n_steps=100, lr=0.1,
                                 init_prior_prec=None, verbose=False):
        """Maximise `log_marginal_likelihood` over ``log λ`` by ``n_steps`` of Adam (learning
        rate ``lr``) from ``init_prior_prec`` (default the current ``λ``); sets and returns
        ``λ`` (a float)."""
        self._check_fitted()
        if method != "marglik":
            raise ValueError(f"method={method!r}: LastLayerLMLaplace optimises the prior by "
                             "marginal likelihood ('marglik')")
        start = self.prior_precision if init_prior_prec is None else init_prior_prec
        log_lam = torch.tensor(math.log(float(start)), dtype=self.theta_map.dtype,
                               requires_grad=True)
        opt = torch.optim.Adam([log_lam], lr=lr)
        for _ in range(n_steps):
            opt.zero_grad()
            (-self.log_marginal_likelihood(log_lam.exp())).backward()
            opt.step()
        self.prior_precision = float(log_lam.detach().exp())
        if verbose:
            print(f"prior precision by marginal likelihood: {self.prior_precision}")
        return self.prior_precision

    # ------------------------------------------------------------------ the posterior
    @property
    def posterior_precision(self):
        """``H = (n/T) M + λ I``, dense ``(P, P)`` in the flat layout (small layers only)."""
        self._check_fitted()
        lam, s = float(self._lam()), self._scale()
        if self.form == "diag":
            return torch.diag((s * self.M + lam).reshape(-1)[self._flat_to_kron()])
        if self.form == "dense":
            M = self.M
        else:
            G = torch.diag(self.pbar) - self.B @ self.B.T
            M = torch.kron(G.contiguous(), self.A.contiguous())
        perm = self._flat_to_kron().to(M.device)
        H = s * M[perm][:, perm]
        return H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)

    # ------------------------------------------------------------------ predictive
    def _variance_parts(self, X):
        """For features ``X`` ``(m, D)``: the diagonal ``(m, V)`` of ``Var(f*)``, its row sums
        ``(m, V)`` and total ``(m, 1)``; or the full ``(m, V, V)`` (dense form)."""
        lam, s = float(self._lam()), self._scale()
        if self.form == "diag":
            key = ("diag", lam, float(s))
            if key not in self._cache:  # H⁻¹'s entries, once per prior
                self._cache = {key: (1.0 / (s * self.M + lam)).T.contiguous()}
            d = (X * X) @ self._cache[key]
            return d, d, d.sum(-1, keepdim=True)
        if self.form == "dense":
            V, D = self.theta_map.shape
            Hinv = torch.linalg.inv(self._precision_kron(lam, s)).reshape(V, D, V, D)
            return torch.einsum("mj,cjek,mk->mce", X, Hinv, X)
        diag_k, row_k = self._kfac_inverse_parts(lam, s)
        z2 = (X @ self.UA) ** 2  # (m, D)
        row = z2 @ row_k
        return z2 @ diag_k, row, row.sum(-1, keepdim=True)

    def _precision_kron(self, lam, s):
        eye = torch.eye(self.M.shape[0], dtype=self.M.dtype, device=self.M.device)
        return s * self.M + lam * eye

    def functional_variance(self, batch):
        """The diagonal of ``Var(f*) = J* H⁻¹ J*ᵀ`` at every position of ``batch``:
        ``(n, T, V)``."""
        self._check_fitted()
        X, shape = self._all_positions(batch)
        out = []
        for i in range(0, X.shape[0], self.chunk_size):
            parts = self._variance_parts(X[i:i + self.chunk_size])
            out.append(torch.diagonal(parts, dim1=-2, dim2=-1) if torch.is_tensor(parts)
                       else parts[0])
        return torch.cat(out).reshape(*shape, -1)

    def _all_positions(self, batch):
        batch = self._as_batch(batch)
        with torch.no_grad():
            h = self.features(batch)
        X = h.reshape(-1, h.shape[-1]).to(self.theta_map.dtype)
        if self.has_bias:
            X = torch.cat([X, torch.ones_like(X[:, :1])], dim=1)
        return X, h.shape[:2]

    def predictive(self, batch, link_approx="probit", n_samples=100, generator=None,
                   pred_type="glm"):
        """The GLM predictive's token probabilities at every position of ``batch`` (a dict
        with ``input_ids`` and ``attention_mask``, or an ``input_ids`` tensor): ``(n, T, V)``.

        ``link_approx``: ``'probit'`` (``softmax(f / sqrt(1 + π/8 diag Σ))``), ``'bridge'`` /
        ``'bridge_norm'`` (the Laplace bridge, as [`Laplace.predictive`][nngeometry.laplace.Laplace.predictive]: it needs
        ``diag Σ`` and ``Σ 1`` only) or ``'mc'`` (``n_samples`` draws of ``f``; Diag and Dense:
        KFAC's ``Σ`` is a full ``V × V`` matrix per position)."""

        self._check_fitted()
        if pred_type != "glm":
            raise ValueError(f"pred_type={pred_type!r}: the last-layer language-model Laplace "
                             "has the GLM predictive ('glm') only")
        if link_approx not in _LINKS:
            raise ValueError(f"link_approx={link_approx!r}: use 'probit', 'bridge', "
                             "'bridge_norm' or 'mc'")
        if link_approx == "mc" and self.form == "kfac":
            raise ValueError("link_approx='mc' with KFAC: the logits' covariance is a full V × V "
                             "matrix per position; use 'probit' or 'bridge', or PMatDiag")
        X, shape = self._all_positions(batch)
        out = []
        with torch.no_grad():
            for i in range(0, X.shape[0], self.chunk_size):
                x = X[i:i + self.chunk_size]
                f = self._logits(x)
                parts = self._variance_parts(x)
                if torch.is_tensor(parts):  # dense: (m, V, V)
                    var = parts
                    diag = torch.diagonal(var, dim1=-2, dim2=-1)
                    row, tot = var.sum(-1), var.sum((-2, -1))[:, None]
                else:
                    var = None
                    diag, row, tot = parts
                if link_approx == "probit":
                    out.append(torch.softmax(f / torch.sqrt(1 + math.pi / 8 * diag), dim=-1))
                elif link_approx in ("bridge", "bridge_norm"):
                    out.append(_bridge_from_parts(f, diag, row, tot,
                                                  normalise=link_approx == "bridge_norm"))
                else:
                    z = torch.randn((n_samples, *f.shape), generator=generator, dtype=f.dtype,
                                    device=f.device)
                    if var is None:
                        samples = f + diag.sqrt() * z
                    else:
                        L = torch.linalg.cholesky(var)
                        samples = f + torch.einsum("mce,sme->smc", L, z)
                    out.append(torch.softmax(samples, dim=-1).mean(0))
        return torch.cat(out).reshape(*shape, -1)


__all__ = ["LastLayerLMLaplace"]
