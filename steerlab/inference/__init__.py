"""Prompts x personae runs: resumable sharded inference, results, merge, persona space, report."""

from steerlab.inference.geometry import PersonaSpace, persona_space
from steerlab.inference.infer import InferConfig, load_prompts, run_inference
from steerlab.inference.report import run_tokenizer, write_persona_space_page, write_run_report
from steerlab.inference.results import (
    RunActivations,
    load_results,
    read_activations,
    read_per_token,
)
from steerlab.inference.runs import merge_run

__all__ = [
    "InferConfig", "PersonaSpace", "RunActivations", "load_prompts", "load_results",
    "merge_run", "persona_space", "read_activations", "read_per_token", "run_inference",
    "run_tokenizer", "write_persona_space_page", "write_run_report",
]
