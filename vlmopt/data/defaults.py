"""The data a verb uses when the user names none (light: no numpy, no PIL, so the CLI imports it
at start-up): the built-in models' fixed SynthVQA splits; any other model must be given data."""

from __future__ import annotations

from vlmopt.errors import VlmoptError
from vlmopt.frontend.builtins import SYNTHVQA_MODELS


def builtin_default(model: str, data: str | None, split: str = "test") -> str | None:
    """``data`` if given, else the built-in models' fixed SynthVQA ``split`` (calib, test); None
    for any other model (the caller decides whether that is an error)."""
    if data:
        return data
    return f"builtin:synthvqa-{split}" if model in SYNTHVQA_MODELS else None


def default_data(model: str, data: str | None, flag: str = "--data", split: str = "test") -> str:
    """As ``builtin_default``, but a model without a default needs ``flag`` named."""
    out = builtin_default(model, data, split)
    if out is None:
        raise VlmoptError(f"{flag} is required for model {model}")
    return out
