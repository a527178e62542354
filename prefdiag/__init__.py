"""prefdiag: is a DPO-trained checkpoint aligned, or does it only look aligned on the loss curve?

Library entry points (the CLI is a thin layer over these):

- :func:`prefdiag.api.audit`: score a preference dataset under a reference model (or model-free checks only).
- :func:`prefdiag.api.compare`: score it under a reference and a DPO-trained policy (paths, hub ids or models
  already in memory); both return a :class:`prefdiag.result.RunResult` to gate (``apply_gate``) and ``write``.
- :mod:`prefdiag.options`: every option, choice and default (``RunOptions``), no torch.
- :mod:`prefdiag.scorers`: the scorer interface, the engine on a lazily loaded model, the cache around any scorer.
- :mod:`prefdiag.diagnostics`: per-pair flags and the dataset summary, from a table alone.
- :mod:`prefdiag.checks`: model-free data checks (identical, duplicate, conflicting pairs...), no model needed.
- :mod:`prefdiag.data`: every preference dataset shape, loaded into one validated table.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "AdapterDisabled", "RunOptions", "RunResult", "audit", "compare"]


def __getattr__(name: str):  # lazy: `import prefdiag` stays light, torch loads only when scoring
    if name in ("audit", "compare", "RunOptions", "RunResult", "AdapterDisabled"):
        from prefdiag import api

        return getattr(api, name)
    raise AttributeError(name)
