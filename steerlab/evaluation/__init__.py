"""Does a vector steer: rating, the strength search, controls and the verdict."""

from steerlab.evaluation.evaluate import EvalConfig, SteeringEval, evaluate_steering
from steerlab.evaluation.verdict import ValidationReport, validation_report, write_validation

__all__ = [
    "EvalConfig", "SteeringEval", "ValidationReport", "evaluate_steering",
    "validation_report", "write_validation",
]
