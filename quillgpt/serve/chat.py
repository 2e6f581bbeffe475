"""Chat on base models: the messages become a plain-text transcript that the model continues.

QuillGPT's models are base models, trained on plain text with no chat tokens. The transcript is
written the way a play is, which suits the Shakespeare models and reads naturally to any other:

    {system message}                  each system/developer message, as is, then a blank line

    User:
    {user message}

    Assistant:
    {assistant message}

    Assistant:
    ← the model writes from here

The assistant's turn ends at the first blank line: `TURN_END` is added to the request's stop strings.
"""

from __future__ import annotations

from collections.abc import Iterable

SPEAKERS = {"user": "User", "assistant": "Assistant"}
TURN_END = "\n\n"


def render_chat(messages: Iterable[tuple[str, str]]) -> str:
    """(role, text) pairs → the transcript, ending with the assistant's cue."""
    parts = []
    for role, text in messages:
        text = text.strip("\n")
        if role in ("system", "developer"):
            parts.append(f"{text}{TURN_END}")
        else:
            parts.append(f"{SPEAKERS[role]}:\n{text}{TURN_END}")
    return "".join(parts) + f"{SPEAKERS['assistant']}:\n"
