"""The library API: one function per command, each taking an options dataclass and returning a JobResult.

    import moecompress
    result = moecompress.quantize("model", "model-w4", moecompress.QuantizeOptions(bits=4))

Every writing command runs through :func:`moecompress.api.job.execute`, which owns the output
contract (:mod:`moecompress.api.output`): validation before any work, a staging folder, an atomic
swap, no input ever overwritten. The CLI and the YAML pipeline call these functions, nothing else.
"""

from moecompress.api.compress_experts import CompressExpertsOptions, compress_experts
from moecompress.api.heal import HealOptions, heal
from moecompress.api.job import JobResult
from moecompress.api.merge import MergeOptions, merge
from moecompress.api.prune import PruneOptions, prune
from moecompress.api.quantize import QuantizeOptions, quantize
from moecompress.api.stats import StatsOptions, stats

__all__ = [
    "CompressExpertsOptions",
    "HealOptions",
    "JobResult",
    "MergeOptions",
    "PruneOptions",
    "QuantizeOptions",
    "StatsOptions",
    "compress_experts",
    "heal",
    "merge",
    "prune",
    "quantize",
    "stats",
]
