"""lmms-eval integration: the ``vlmopt`` model and tasks over vlmopt datasets.

Registration is the ``lmms_eval.models`` entry point in pyproject.toml, which names
:func:`manifest`; lmms-eval calls it when it builds its model registry, so
``lmms-eval --model vlmopt --model_args artifact=OUT`` finds :class:`.model.VlmoptLMM`.
This module imports neither torch nor lmms-eval until that call (lmms-eval loads every entry
point at start-up).

    python -m vlmopt.integrations.lmms_eval task builtin:synthvqa-test --out tasks/
    lmms-eval --model vlmopt --model_args artifact=OUT --include_path tasks/ \\
        --tasks vlmopt_synthvqa --output_path results/
"""

from __future__ import annotations

MODEL_ID = "vlmopt"
MODEL_CLASS = "vlmopt.integrations.lmms_eval.model.VlmoptLMM"


def manifest():
    """The entry point's payload: lmms-eval's model manifest for ``--model vlmopt``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
