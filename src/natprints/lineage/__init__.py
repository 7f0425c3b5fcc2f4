"""Lineage: is model B derived from model A, or trained from the same seed? Read from the models.

Two methods: SeedPrints (initialization biases, :mod:`natprints.lineage.seedprints`) and the
attention-weight std fingerprint (:mod:`natprints.lineage.weightstd`); experiments over a run's zoo
in :mod:`natprints.lineage.experiments`, the report section in :mod:`natprints.lineage.report`.
"""

from natprints.lineage.experiments import identify, run_lineage
from natprints.lineage.report import render_section
from natprints.lineage.seedprints import SeedPrintsResult, model_features, seedprints_compare, seedprints_test
from natprints.lineage.weightstd import WeightsResult, weight_profile, weights_compare

__all__ = [
    "SeedPrintsResult",
    "WeightsResult",
    "identify",
    "model_features",
    "render_section",
    "run_lineage",
    "seedprints_compare",
    "seedprints_test",
    "weight_profile",
    "weights_compare",
]
