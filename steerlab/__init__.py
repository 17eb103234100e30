"""steerlab: persona experiments and steering vectors on chat LLMs (TransformerLens 4).

Example:
    >>> import steerlab as sl
    >>> model = sl.load_model("embedded")
    >>> ids = sl.encode_chat(model.tokenizer, "Hello!", persona=sl.Persona("Hamlet", "fiction"))
    >>> sl.generate(model, [ids], max_new_tokens=40).texts(model.tokenizer)
"""

from steerlab.capture import capture_pairs
from steerlab.chat import encode_chat, encode_text, patch_chat_template, render_chat
from steerlab.chat_session import ChatSession
from steerlab.client import Endpoint, EndpointClient
from steerlab.collect import collect
from steerlab.demo import DemoConfig, run_demo
from steerlab.errors import SteerlabError
from steerlab.evaluate import evaluate_steering
from steerlab.extract import extract, merge_shards
from steerlab.fitters import LogisticProbe, MeanDifference, PCADifference, fit_vector
from steerlab.generate import Generation, generate, generate_with_metrics
from steerlab.infer import InferConfig, run_inference
from steerlab.judge import filter_pairs, judge, rubric_judge, scorer_judge
from steerlab.layers import decoder_layers
from steerlab.models import load_model
from steerlab.pairs import Pair, load_pairs, merge_pairs, save_pairs
from steerlab.personas import ASSISTANT, Persona, load_personae, system_prompt_style
from steerlab.responders import EndpointResponder, LocalResponder
from steerlab.results import load_results
from steerlab.runs import merge_run
from steerlab.scorers import scorer_from_spec
from steerlab.steer import Positions, Steering, monitor, steer
from steerlab.store import ActivationFile
from steerlab.traits import Trait, load_trait
from steerlab.vectors import SteeringVector
from steerlab.version import __version__

__all__ = [
    "ASSISTANT",
    "ActivationFile",
    "ChatSession",
    "DemoConfig",
    "InferConfig",
    "Endpoint",
    "EndpointClient",
    "EndpointResponder",
    "LocalResponder",
    "Pair",
    "Trait",
    "LogisticProbe",
    "MeanDifference",
    "PCADifference",
    "SteeringVector",
    "Steering",
    "Positions",
    "Generation",
    "Persona",
    "SteerlabError",
    "__version__",
    "capture_pairs",
    "collect",
    "filter_pairs",
    "judge",
    "load_pairs",
    "load_results",
    "run_demo",
    "run_inference",
    "load_trait",
    "merge_pairs",
    "merge_run",
    "rubric_judge",
    "save_pairs",
    "scorer_from_spec",
    "scorer_judge",
    "decoder_layers",
    "encode_chat",
    "encode_text",
    "evaluate_steering",
    "extract",
    "fit_vector",
    "generate",
    "generate_with_metrics",
    "load_model",
    "load_personae",
    "merge_shards",
    "monitor",
    "patch_chat_template",
    "render_chat",
    "steer",
    "system_prompt_style",
]
