"""natprints: natural fingerprints of language models — attribution and lineage on a controlled zoo.

The public API (imported on first use, so ``import natprints`` stays light):

- :func:`load_attributor` and :func:`attribute`: attribute texts with a saved attributor;
- :func:`compare`: is model B of model A's lineage (SeedPrints, weight-std);
- :func:`identify`: rank a library of models by SeedPrints evidence of a shared seed.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_attributor": "natprints.attribution.attributor",
    "attribute": "natprints.attribution.attributor",
    "compare": "natprints.lineage.experiments",
    "identify": "natprints.lineage.experiments",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'natprints' has no attribute {name!r}")
