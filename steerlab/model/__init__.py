"""The model and its inputs: loading, placement, hooks, chat templates, personae."""

from steerlab.model.hooks import HookPoint
from steerlab.model.loading import load_model
from steerlab.model.options import ModelOptions
from steerlab.model.personas import ASSISTANT, Persona, load_personae, system_prompt_style
from steerlab.model.templates import encode_chat, encode_text, patch_chat_template, render_chat

__all__ = [
    "ASSISTANT", "HookPoint", "ModelOptions", "Persona", "encode_chat", "encode_text",
    "load_model", "load_personae", "patch_chat_template", "render_chat",
    "system_prompt_style",
]
