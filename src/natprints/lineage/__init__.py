"""Lineage: is model B derived from model A, or trained from the same seed? Read from the weights.

Two methods: SeedPrints (initialization biases, :mod:`.seedprints`) and the attention-weight std
fingerprint (:mod:`.weightstd`), over the model-directory facts of :mod:`natprints.modeldir`; the stage over a
run's zoo is :mod:`.experiments`. The report section is drawn at report time
(:mod:`natprints.reports.lineage`).
"""
