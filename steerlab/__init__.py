"""steerlab: persona experiments and steering vectors on chat LLMs (TransformerLens 4).

Example:
    >>> import steerlab as sl
    >>> model = sl.load_model("embedded")
    >>> ids = sl.encode_chat(model.tokenizer, "Hello!", persona=sl.Persona("Hamlet", "fiction"))
    >>> sl.generate(model, [ids], max_new_tokens=40).texts(model.tokenizer)
"""

from steerlab.chat import encode_chat, encode_text, patch_chat_template, render_chat
from steerlab.errors import SteerlabError
from steerlab.generate import Generation, generate
from steerlab.layers import decoder_layers
from steerlab.models import load_model
from steerlab.personas import ASSISTANT, Persona, load_personae, system_prompt_style

__version__ = "0.1.0"

__all__ = [
    "ASSISTANT",
    "Generation",
    "Persona",
    "SteerlabError",
    "__version__",
    "decoder_layers",
    "encode_chat",
    "encode_text",
    "generate",
    "load_model",
    "load_personae",
    "patch_chat_template",
    "render_chat",
    "system_prompt_style",
]
