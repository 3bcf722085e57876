"""vlmopt.passes: one module per pass; importing this package registers them all."""

from vlmopt.passes import drop_tokens  # noqa: F401
from vlmopt.passes import freeze_visual  # noqa: F401
from vlmopt.passes import select_visual  # noqa: F401
