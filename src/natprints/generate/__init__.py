"""The generate stage: prompts, the sampler, and the per-model parquet corpora."""
