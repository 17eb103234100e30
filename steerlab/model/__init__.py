"""The model and its inputs: loading, placement, hooks, chat templates, personae."""

from steerlab.model.hooks import HookPoint
from steerlab.model.inputs import left_pad
from steerlab.model.loading import embedded_model_dir, load_model, parse_dtype
from steerlab.model.options import ModelOptions
from steerlab.model.personas import ASSISTANT, Persona, load_personae, system_prompt_style
from steerlab.model.templates import encode_chat, encode_text, patch_chat_template, render_chat

__all__ = [
    "ASSISTANT", "HookPoint", "ModelOptions", "Persona", "embedded_model_dir",
    "encode_chat", "encode_text", "left_pad", "load_model", "load_personae",
    "parse_dtype", "patch_chat_template", "render_chat", "system_prompt_style",
]
