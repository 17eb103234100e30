"""Does a vector steer: rating, the strength search, controls and the verdict."""

from steerlab.evaluation.evaluate import EvalConfig, SteeringEval, evaluate_steering
from steerlab.evaluation.rating import AnswerRater, Setting
from steerlab.evaluation.verdict import ValidationReport, validation_report, write_validation

__all__ = [
    "AnswerRater", "EvalConfig", "Setting", "SteeringEval", "ValidationReport",
    "evaluate_steering",
    "validation_report", "write_validation",
]
