"""vlmopt: an offline, compiler-style optimizer for vision-language models.

Python API::

    import vlmopt
    lm = vlmopt.load("builtin:synth-llava")
    gm = vlmopt.capture(lm)                       # torch.fx block graph, bit-exact
    opt = vlmopt.apply_plan(lm, "plan.json")      # rewritten graph
    print(vlmopt.flops(lm, opt)["ratio"])         # analytic prefill FLOPs vs the original
    print(vlmopt.evaluate(lm, "builtin:synthvqa-test", graph=opt).accuracy)
"""

from __future__ import annotations

from vlmopt.version import __version__

__all__ = ["load", "capture", "apply_plan", "flops", "evaluate", "__version__"]


def __getattr__(name):  # lazy: `import vlmopt` stays cheap (no torch import)
    if name in __all__:
        from vlmopt import api

        return getattr(api, name)
    raise AttributeError(name)
