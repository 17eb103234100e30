"""What a steering intervention is: the vector, the frozen Steering value, monitors."""

from steerlab.steering.baking import bake
from steerlab.steering.intervention import Positions, Steering, Units, steer
from steerlab.steering.monitoring import monitor
from steerlab.steering.norms import residual_norms
from steerlab.steering.operators import Operator
from steerlab.steering.reference import reference_value, with_reference
from steerlab.steering.vector import SteeringVector, random_like

__all__ = [
    "Operator", "Positions", "Steering", "SteeringVector", "Units", "bake", "monitor",
    "random_like", "reference_value", "residual_norms", "steer", "with_reference",
]
