"""Markdown cells and tables every report section writes with."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def acc_cell(acc: float, low: float, high: float) -> str:
    return f"{acc:.3f} [{low:.3f}, {high:.3f}]"


def p_cell(p: float) -> str:
    if p <= 0:
        return "< 1e-300"  # below double precision
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def share_cell(share: float) -> str:
    return "–" if share is None or math.isnan(share) else f"{share:.2f}"


def group_rows(rows: Sequence[dict[str, Any]], keys: tuple[str, ...]) -> list[tuple[tuple, list[dict[str, Any]]]]:
    """Rows grouped by ``keys``, groups in order of first appearance."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return list(out.items())
