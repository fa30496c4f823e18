"""Steering: the five ops researchers run most, as tensor kernels shared by every backend, and
the toolkit to build steering vectors.

``steer`` adds ``scale * v``; ``scale`` multiplies; ``ablate`` projects a direction out;
``clamp`` clamps the projection onto a direction to ``[min, max]``; ``replace`` sets the value.
Directions are normalized internally. Each op applies only at selected positions.

:class:`SteeringVector` (per-layer tensors + metadata, safetensors files) and
:func:`train_vector` (contrastive prompts -> vector, one batched capture) build vectors;
``vinterp.evals.sweep`` measures them over a layer x scale grid.
"""

from vinterp.steering.kernels import apply_steering, position_mask
from vinterp.steering.train import fit_direction, train_vector
from vinterp.steering.vectors import SteeringVector

__all__ = ["SteeringVector", "apply_steering", "fit_direction", "position_mask",
           "train_vector"]
