"""Output transforms: the functions ``g`` of a model's outputs ``f`` whose Jacobians give the
curvatures, ``(1/n) Σ_x J_g(x)ᵀ J_g(x)``.

One module per concern:

* `transform`: `OutputTransform` (``g = transform(function(*batch))``, with its optional
  output-space matrix), `BatchInfo`, and a language model's convention (`LMConvention`,
  detected by `lm_convention`);
* `closed_form`: the Fisher in closed form (`closed_form_function`: regression, Bernoulli,
  softmax with the multinomial covariance's square root `multinomial_covariance_sqrt`);
* `monte_carlo`: the Fisher by sampled targets (`monte_carlo_function`);
* `rng`: the counter-based uniforms behind seeded sampling (`batch_key`, `counter_uniform`);
* `empirical`: the empirical Fisher (`empirical_function`);
* `ggn`: the generalized Gauss-Newton matrix (`ggn_function`);
* `losses`: losses of observed targets and the registry of losses with a closed-form output
  Hessian (`known_loss`);
* `output_hessians`: per-example output Hessians of any loss and their square roots;
* `positions`: the positions of the outputs and the class axis;
* `language_models`: the positions of a language model's outputs under its convention (causal
  shift, padding, per-token mean).
"""
from .closed_form import (CLOSED_FORM_VARIANTS, closed_form_function,
                          multinomial_covariance_sqrt, softmax_metric)
from .empirical import empirical_function
from .ggn import ggn_function
from .language_models import lm_positions
from .losses import (LOSS_NAMES, cross_entropy_losses, known_loss, loss_or_default,
                     per_example_losses, targets_of)
from .monte_carlo import MC_VARIANTS, check_covariance, monte_carlo_function
from .output_hessians import output_hessians, psd_sqrt
from .positions import (POSITIONS, check_class_dim, check_positions, class_positions,
                        output_class_dim)
from .rng import batch_key, counter_uniform
from .transform import BatchInfo, LMConvention, OutputTransform, is_causal_lm, lm_convention

__all__ = [
    "BatchInfo", "CLOSED_FORM_VARIANTS", "LMConvention", "LOSS_NAMES", "MC_VARIANTS",
    "OutputTransform", "POSITIONS", "batch_key", "check_class_dim", "check_covariance",
    "check_positions", "class_positions", "closed_form_function", "counter_uniform",
    "cross_entropy_losses", "empirical_function", "ggn_function", "is_causal_lm",
    "known_loss", "lm_convention", "lm_positions", "loss_or_default", "monte_carlo_function",
    "multinomial_covariance_sqrt", "output_class_dim", "output_hessians", "per_example_losses",
    "psd_sqrt", "softmax_metric", "targets_of",
]
