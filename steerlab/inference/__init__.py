"""Prompts x personae runs: resumable sharded inference, results, merge, report."""

from steerlab.inference.infer import InferConfig, run_inference
from steerlab.inference.report import write_run_report
from steerlab.inference.results import load_results
from steerlab.inference.runs import merge_run

__all__ = [
    "InferConfig", "load_results", "merge_run", "run_inference", "write_run_report",
]
