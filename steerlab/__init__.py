"""steerlab: persona experiments and steering vectors on chat LLMs (TransformerLens 4).

Examples:
    >>> import steerlab as sl
    >>> model = sl.load_model("embedded")
    >>> ids = sl.encode_chat(model.tokenizer, "Hello!", persona=sl.Persona("Hamlet", "fiction"))
    >>> replies = sl.generate(model, [ids], max_new_tokens=4).texts(model.tokenizer)
    >>> len(replies)  # one reply (a str) per prompt
    1

The names below are the stable API; each subpackage (``steerlab.model``, ``steerlab.steering``,
``steerlab.generation``, ...) exports a few more of its own.
"""

import sys
from typing import Any

from steerlab.base import SteerlabError, __version__
from steerlab.base import moved as _moved
from steerlab.chat import ChatSession
from steerlab.demo import DemoConfig, run_demo
from steerlab.evaluation import EvalConfig, SteeringEval, evaluate_steering, validation_report
from steerlab.extraction import (
    ActivationFile,
    LogisticProbe,
    MeanDifference,
    PCADifference,
    capture_pairs,
    extract,
    fit_vector,
)
from steerlab.generation import Engine, Generation, generate, generate_with_metrics
from steerlab.inference import (
    InferConfig,
    PersonaSpace,
    load_results,
    merge_run,
    persona_space,
    read_activations,
    run_inference,
)
from steerlab.model import (
    ASSISTANT,
    ModelOptions,
    Persona,
    encode_chat,
    encode_text,
    load_model,
    load_personae,
    patch_chat_template,
    render_chat,
    system_prompt_style,
)
from steerlab.steering import (
    Operator,
    Positions,
    Steering,
    SteeringVector,
    Units,
    monitor,
    steer,
)
from steerlab.traits import (
    Endpoint,
    EndpointClient,
    Pair,
    Trait,
    collect,
    elicit_trait,
    filter_pairs,
    judge,
    load_pairs,
    load_trait,
    merge_pairs,
    rubric_judge,
    save_pairs,
    scorer_from_spec,
    scorer_judge,
)

__all__ = [
    "ASSISTANT", "ActivationFile", "ChatSession", "DemoConfig", "Endpoint", "EndpointClient",
    "Engine", "EvalConfig", "Generation", "InferConfig", "LogisticProbe", "MeanDifference",
    "ModelOptions", "Operator", "PCADifference", "Pair", "Persona", "PersonaSpace", "Positions",
    "SteerlabError", "Steering", "SteeringEval", "SteeringVector", "Trait", "Units", "__version__",
    "capture_pairs", "collect", "elicit_trait", "encode_chat", "encode_text", "evaluate_steering",
    "extract", "filter_pairs", "fit_vector", "generate", "generate_with_metrics", "judge",
    "load_model", "load_pairs", "load_personae", "load_results", "load_trait", "merge_pairs",
    "merge_run", "monitor", "patch_chat_template", "persona_space", "read_activations",
    "render_chat", "rubric_judge", "run_demo", "run_inference", "save_pairs", "scorer_from_spec",
    "scorer_judge", "steer", "system_prompt_style", "validation_report",
]

_moved.install()

# Names the package root exported in steerlab 0.1 that are internal helpers: still found,
# with a DeprecationWarning naming where they live (removed in steerlab 0.3).
_DROPPED = {
    "decoder_layers": ("model.hooks",),
    "merge_shards": ("extraction.extractor",),
    "EndpointResponder": ("traits.responders",),
    "LocalResponder": ("traits.responders",),
}


def __getattr__(name: str) -> Any:
    if name in _DROPPED:
        return _moved.moved_attribute("", name, _DROPPED[name])
    if name in _moved.MOVED:  # an old module path, as an attribute of the package
        return sys.modules[f"{__name__}.{name}"]
    raise AttributeError(f"module 'steerlab' has no attribute {name!r}")
