"""Steering: the five ops researchers run most, as tensor kernels shared by every backend.

``steer`` adds ``scale * v``; ``scale`` multiplies; ``ablate`` projects a direction out;
``clamp`` clamps the projection onto a direction to ``[min, max]``; ``replace`` sets the value.
Directions are normalized internally. Each op applies only at selected positions.
"""

from vinterp.steering.kernels import apply_steering, position_mask

__all__ = ["apply_steering", "position_mask"]
