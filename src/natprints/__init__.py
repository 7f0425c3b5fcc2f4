"""natprints: natural fingerprints of language models — attribution and lineage on a controlled zoo."""

__version__ = "0.1.0"
