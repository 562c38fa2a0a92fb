"""A tokenizer's chat template, rendered as one line of error when it fails.

A chat template is a Jinja program shipped with the checkpoint: it can call ``raise_exception``, trip
transformers' sandbox (``SecurityError``) or fail on a message it does not expect. Any of these is the
checkpoint's problem, reported in one line, never a traceback."""

from __future__ import annotations

from typing import Any, Literal

from melayer.util.errors import MelayerError, one_line

ChatSetting = bool | Literal["auto"]  # use the chat template, or not, or "auto": when the tokenizer has one


def render_chat(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                name: str = "the model") -> str:
    """``tokenizer.apply_chat_template(messages)`` as text; a template that fails is one :class:`MelayerError`."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise MelayerError(f"the chat template of {name} failed ({type(exc).__name__}: {one_line(exc)}); run "
                           "without it (--chat off)") from None
