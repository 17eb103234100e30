"""Interactive chat with a steered model: the session behind the terminal and the widget."""

from typing import TYPE_CHECKING, Any

from steerlab.base import moved as _moved
from steerlab.chat.drift import Drift, conversation_drift, load_conversations
from steerlab.chat.session import ChatSession

if TYPE_CHECKING:  # for readers and the API reference; at run time __getattr__ loads it
    from steerlab.chat.widget import SteeringChat

__all__ = ["ChatSession", "Drift", "SteeringChat", "conversation_drift", "load_conversations"]


def __getattr__(name: str) -> Any:
    if name == "SteeringChat":
        # deferred: steerlab.chat.widget imports ipywidgets, an optional extra (notebooks)
        from steerlab.chat.widget import SteeringChat

        return SteeringChat
    # steerlab 0.1's steerlab.chat was the chat templates, now steerlab.model.templates
    return _moved.moved_attribute("chat", name, ("model.templates",), globals())
