"""User-facing errors: one line that names the file, line or flag at fault."""

from __future__ import annotations


class VlmoptError(Exception):
    """An error caused by the user's input. The CLI prints it as one line and exits non-zero."""


class PlanError(VlmoptError, ValueError):
    """A plan that cannot be applied (unknown pass, bad field, wrong schema, other model).

    Also a ``ValueError``: a pass that rejects its config raises ``ValueError``, and the pass
    manager re-raises it as a ``PlanError`` that callers may still catch as one.
    """


class VerifyError(VlmoptError):
    """A graph that breaks an invariant; the message names the pass, the node and the invariant."""
