"""Influence scores against kronfluence (skipped where it is not installed): same model, data,
damping and factor strategy, pairwise, self and per-module scores to 1e-4 relative.

Conventions aligned:

* curvature: kronfluence's factors are Fisher statistics of the gradients of its training
  loss; with ``use_empirical_fisher=True`` they are those of the observed targets, our
  ``curvature='empirical'`` (``EmpiricalFisher``), the mean over the examples on both sides;
* losses: kronfluence's task returns the loss summed over the batch, whose per-example
  gradients are those of our per-example losses (``reduction='none'``); the measurement is the
  same loss;
* KFAC: kronfluence damps the Kronecker eigenvalues ``λ_A ⊗ λ_G + λ``, i.e. ``(A ⊗ G + λI)⁻¹``:
  our ``PMatKFAC`` with ``damping='exact'`` (the default in ``Influence``), not π-damping;
  the bias is the last column of ``[W | b]`` with a 1 appended to the inputs on both sides;
* EKFAC: both refit the eigenvalues in the KFAC eigenbasis on the training data;
* diagonal: kronfluence's diagonal of the mean squared per-example gradients is our
  ``PMatDiag``; identity: kronfluence applies no damping, our ``PMatEye`` with ``damping=0``;
* damping: kronfluence's ``damping_factor`` is one scalar ``λ``; ``damping_factor=None`` is its
  heuristic ``0.1 × mean`` of each module's eigenvalues (or diagonal), our
  ``damping='heuristic'``;
* orientation: both ``(n_query, n_train)``; dtypes: kronfluence's factor, gradient, lambda and
  score dtypes set to float64.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

kronfluence = pytest.importorskip("kronfluence")

from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

from nngeometry.influence import Influence  # noqa: E402
from nngeometry.object import PMatDiag, PMatEKFAC, PMatEye, PMatKFAC  # noqa: E402

N_TRAIN, N_QUERY = 24, 5


class _Classification(Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double().eval()
    x = torch.randn(N_TRAIN + N_QUERY, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (N_TRAIN + N_QUERY,))
    return model, TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    model, train, query = _setup()
    task = _Classification()
    # prepare_model replaces the modules in place: kronfluence gets its own copy
    kmodel = prepare_model(copy.deepcopy(model), task)
    an = Analyzer(analysis_name="nngeometry", model=kmodel, task=task, cpu=True,
                  disable_tqdm=True, output_dir=str(tmp_path_factory.mktemp("kronfluence")))
    return model, train, query, an


def _kronfluence_scores(an, train, query, strategy, damping):
    f64 = torch.float64
    fargs = FactorArguments(strategy=strategy, use_empirical_fisher=True,
                            activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
                            eigendecomposition_dtype=f64, per_sample_gradient_dtype=f64,
                            lambda_dtype=f64)
    name = f"{strategy}"
    an.fit_all_factors(factors_name=name, dataset=train, per_device_batch_size=8,
                       factor_args=fargs, overwrite_output_dir=True)
    sargs = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=f64,
                           precondition_dtype=f64, score_dtype=f64)
    sname = f"{strategy}_{damping}"
    an.compute_pairwise_scores(scores_name=sname, factors_name=name, query_dataset=query,
                               train_dataset=train, per_device_query_batch_size=N_QUERY,
                               per_device_train_batch_size=8, score_args=sargs,
                               overwrite_output_dir=True)
    return an.load_pairwise_scores(sname)["all_modules"]


@pytest.mark.parametrize("strategy,rep,damping", [
    ("ekfac", PMatEKFAC, 1e-3), ("ekfac", PMatEKFAC, None), ("kfac", PMatKFAC, 1e-3),
    ("diagonal", PMatDiag, 1e-3), ("diagonal", PMatDiag, None), ("identity", PMatEye, 0.0)])
def test_pairwise_scores_agree_with_kronfluence(analyzer, strategy, rep, damping):
    model, train, query, an = analyzer
    want = _kronfluence_scores(an, train, query, strategy, damping)
    inf = Influence(model, rep, curvature="empirical",
                    damping="heuristic" if damping is None else damping)
    inf.fit(DataLoader(train, batch_size=8))
    got = inf.pairwise_scores(DataLoader(train, batch_size=8), DataLoader(query, batch_size=N_QUERY))
    assert got.shape == want.shape == (N_QUERY, N_TRAIN)
    assert torch.allclose(got, want.to(got.dtype), rtol=1e-4, atol=1e-4 * want.abs().max())


def test_self_and_per_module_scores_agree_with_kronfluence(analyzer):
    model, train, query, an = analyzer
    f64 = torch.float64
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=True,
                            activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
                            eigendecomposition_dtype=f64, per_sample_gradient_dtype=f64,
                            lambda_dtype=f64)
    an.fit_all_factors(factors_name="ekfac_self", dataset=train, per_device_batch_size=8,
                       factor_args=fargs, overwrite_output_dir=True)
    sargs = ScoreArguments(damping_factor=1e-3, per_sample_gradient_dtype=f64,
                           precondition_dtype=f64, score_dtype=f64,
                           compute_per_module_scores=True)
    an.compute_self_scores(scores_name="self", factors_name="ekfac_self", train_dataset=train,
                           per_device_train_batch_size=8, score_args=sargs,
                           overwrite_output_dir=True)
    an.compute_pairwise_scores(scores_name="per_module", factors_name="ekfac_self",
                               query_dataset=query, train_dataset=train,
                               per_device_query_batch_size=N_QUERY,
                               per_device_train_batch_size=8, score_args=sargs,
                               overwrite_output_dir=True)
    self_kf = an.load_self_scores("self")
    pairs_kf = an.load_pairwise_scores("per_module")
    inf = Influence(model, PMatEKFAC, curvature="empirical", damping=1e-3)
    loader = DataLoader(train, batch_size=8)
    inf.fit(loader)
    self_ours = inf.self_scores(loader, per_layer=True)
    pairs_ours = inf.pairwise_scores(loader, DataLoader(query, batch_size=N_QUERY), per_layer=True)
    # kronfluence names a module's scores by its module name; ours come in the layers' order
    for i, lid in enumerate(inf.layer_collection.layer_ids()):
        for got, want in ((self_ours[i], self_kf[lid]), (pairs_ours[i], pairs_kf[lid])):
            assert torch.allclose(got, want.to(got.dtype), rtol=1e-4,
                                  atol=1e-4 * want.abs().max())
