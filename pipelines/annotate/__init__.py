"""The annotate job: Ray Data plan, stages, the commit loop, run summary."""

from pipelines.annotate.job import (
    RunSummary,
    connect,
    decode_sizes,
    plan_pools,
    resolve_models,
    run,
)

__all__ = ["RunSummary", "connect", "decode_sizes", "plan_pools", "resolve_models", "run"]
