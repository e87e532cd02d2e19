"""The annotate job: Ray Data plan, stages, the commit loop, run summary.

Names are loaded on first use: a Ray worker that unpickles the read stage
(pipelines.annotate.read) must not import the job, and with it torch.
"""

from importlib import import_module

# (connect is its own module, pipelines.annotate.connect: Ray, no torch)
__all__ = ["RunSummary", "decode_sizes", "resolve_models", "run"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module("pipelines.annotate.job"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
