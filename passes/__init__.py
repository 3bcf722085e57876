"""vlmopt.passes: one module per pass; importing this package registers them all."""

from vlmopt.passes import (
    drop_tokens,  # noqa: F401
    freeze_visual,  # noqa: F401
    lowrank_qk,  # noqa: F401
    merge_vision,  # noqa: F401
    quantize,  # noqa: F401
    select_visual,  # noqa: F401
)
