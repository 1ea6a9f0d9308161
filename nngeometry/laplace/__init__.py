"""Laplace approximations of a trained network's posterior.

* [`Laplace`][nngeometry.laplace.Laplace] and
  [`marglik_training`][nngeometry.laplace.marglik_training] (`weight_space.py`): the
  weight-space Laplace over any representation, its evidence, predictives and samples;
* [`FunctionalLaplace`][nngeometry.laplace.FunctionalLaplace] (`functional.py`): the linearised
  network's posterior seen as a Gaussian process (built on `Laplace`);
* [`LastLayerLMLaplace`][nngeometry.laplace.LastLayerLMLaplace] (`last_layer_lm.py`): the
  last-layer Laplace of a language model, token positions as examples.

Each module imports only from the ones listed before it; this package gathers their public
names (the modules `nngeometry.laplace_gp` and `nngeometry.laplace_lm` are upstream-style import
paths that re-export the same objects).
"""
from .weight_space import Laplace, marglik_training
from .functional import FunctionalLaplace
from .last_layer_lm import LastLayerLMLaplace

__all__ = ["Laplace", "marglik_training", "FunctionalLaplace", "LastLayerLMLaplace"]
