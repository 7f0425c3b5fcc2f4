"""A string's probability over its most probable tokenizations, not only its canonical one.

A model writes a string through any token path that decodes to it, so p(string) sums over every
segmentation. Scoring the canonical one alone is a lower bound that can be far off: a model often
samples ``" th" + "e"`` where its tokenizer would read ``" the"``, and the canonical path then misses
the path the model took. The exact sum is out of reach (a string of n bytes has up to 2^n paths), but
its mass sits on a few paths near the canonical one, which a guided search finds:

1. **Canonical pass.** The canonical path is teacher-forced; at each of its token boundaries the
   same forward also gives log p of every *other* token whose bytes start the rest of the string.
2. **Single edits.** Each such token ``a`` at boundary i opens an edit: ``a``, then the bytes up to the
   next canonical boundary (or the one after it) re-tokenized, then the canonical path again. Its
   score is estimated from the canonical pass as log p(a) minus the log p of the canonical tokens it
   replaces (optimistic: the re-tokenized fragment is counted as free); the ``beam`` best edits
   within ``margin`` nats of the canonical path are teacher-forced exactly.
3. **Combined edits.** Edits that do not overlap combine; the combinations whose summed exact gains
   are largest (within ``margin``) are teacher-forced exactly, up to ``beam`` of them.

The result is log sum_p p(path) over the distinct paths scored exactly: a lower bound on
log p(string) that is never below the canonical path's, and that equals it where no other path
comes within ``margin`` nats. Paths are compared as bytes: every path's token bytes
(:class:`Surfaces`) join to the canonical path's, so each decodes to the same text. A tokenizer whose
pieces this module cannot turn into bytes (:func:`surfaces` returns None) keeps the canonical score.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from natprints.errors import NatprintsError

BEAM = 8  # paths teacher-forced per round (single edits, then combinations)
MARGIN = 4.0  # nats: a path estimated below the canonical's by more adds < 2% to the sum
COMBINE = 6  # the best single edits whose combinations are considered (2^6 subsets at most)


@dataclass(frozen=True)
class Surfaces:
    """What each token of a tokenizer writes, as bytes, and the token of each byte string."""

    pieces: list[bytes | None]  # id -> bytes (None: a special token, never part of a text)
    index: dict[bytes, int]  # bytes -> the id that writes them
    longest: int

    def path_bytes(self, ids: Sequence[int]) -> bytes | None:
        parts = [self.pieces[i] if 0 <= i < len(self.pieces) else None for i in ids]
        return None if any(p is None for p in parts) else b"".join(parts)  # type: ignore[arg-type]


def _byte_level_table() -> dict[str, int]:
    """The printable character byte-level BPE writes for each byte (GPT-2's reversible map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _piece_bytes(piece: str, decoder: dict) -> bytes | None:
    kind = decoder.get("type")
    if kind == "ByteLevel":
        table = _byte_level_table()
        out = [table.get(ch) for ch in piece]
        return None if any(b is None for b in out) else bytes(out)  # type: ignore[arg-type]
    if kind == "Metaspace":
        return piece.replace(decoder.get("replacement", "\u2581"), " ").encode("utf-8")
    if kind == "Sequence":
        steps = decoder.get("decoders", [])
        text = piece
        for step in steps:
            t = step.get("type")
            if t == "ByteFallback":
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                    return bytes([int(piece[3:5], 16)])
            elif t == "Replace":
                pattern = step.get("pattern", {}).get("String")
                if pattern is None:
                    return None
                text = text.replace(pattern, step.get("content", ""))
            elif t not in ("Fuse", "Strip"):  # both act on the whole text, not on a piece
                return None
        return text.encode("utf-8")
    return None


def surfaces(tokenizer: Any) -> Surfaces | None:
    """The bytes each token writes, for byte-level BPE and SentencePiece-style tokenizers; else None."""
    try:
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    except AttributeError:
        return None
    special = set(getattr(tokenizer, "all_special_ids", []))
    pieces: list[bytes | None] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        data = None if i in special or piece is None else _piece_bytes(piece, decoder)
        if data is None and i not in special and piece is not None:
            return None  # a piece this module cannot read: keep the canonical score
        pieces.append(data or None)
    index: dict[bytes, int] = {}
    for i, data in enumerate(pieces):
        if data is not None:
            index.setdefault(data, i)
    return Surfaces(pieces, index, max((len(p) for p in index), default=0))


def string_reader(tokenizer: Any) -> tuple[Surfaces | None, Any]:
    """(surfaces, fragment tokenizer) of ``tokenizer``: what :func:`score_segmentations` reads it through."""

    @functools.cache  # fragments repeat across texts
    def tokenize(data: bytes) -> tuple[int, ...] | None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    return surfaces(tokenizer), tokenize


@dataclass(frozen=True)
class Edit:
    """Canonical tokens ``[start, stop)`` replaced by ``ids``; ``estimate``: the gain in log p it is
    expected to bring (from the canonical pass)."""

    start: int
    stop: int
    ids: tuple[int, ...]
    estimate: float


def _offsets(surf: Surfaces, ids: Sequence[int]) -> np.ndarray:
    lengths = [len(surf.pieces[i] or b"") for i in ids]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def alternatives(surf: Surfaces, ids: Sequence[int]) -> list[list[int]]:
    """Per canonical boundary i: every other token whose bytes start the string's rest at that boundary."""
    data = surf.path_bytes(ids)
    if data is None:
        return [[] for _ in ids]
    offsets = _offsets(surf, ids)
    out = []
    for i, token in enumerate(ids):
        start = int(offsets[i])
        found = []
        for length in range(1, min(surf.longest, len(data) - start) + 1):
            other = surf.index.get(data[start : start + length])
            if other is not None and other != token:
                found.append(other)
        out.append(found)
    return out


def single_edits(
    surf: Surfaces,
    tokenize: Any,
    ids: Sequence[int],
    logprobs: np.ndarray,
    alternative_logprobs: list[dict[int, float]],
) -> list[Edit]:
    """The edits opened by each alternative token (see the module's note), best estimate first.

    ``alternative_logprobs``: per boundary, token -> its log p there (from :func:`teacher_force`).
    ``tokenize(bytes) -> ids | None`` re-tokenizes a fragment (None: it cannot, e.g. a cut character).
    A fragment whose re-tokenization writes other bytes (a SentencePiece tokenizer marks a fragment's
    start as a word start) opens no edit.
    """
    data = surf.path_bytes(ids)
    if data is None:
        return []
    offsets = _offsets(surf, ids)
    cumulative = np.concatenate([[0.0], np.cumsum(logprobs)])
    edits: dict[tuple, Edit] = {}
    for i, options in enumerate(alternative_logprobs):
        for token, first in options.items():
            end = int(offsets[i]) + len(surf.pieces[token] or b"")
            j = int(np.searchsorted(offsets, end, side="left"))  # first canonical boundary at or after end
            for stop in (j, j + 1):
                if stop > len(ids):
                    continue
                rest = data[end : int(offsets[stop])]
                tail = tokenize(rest) if rest else []
                if tail is None or (rest and surf.path_bytes(tail) != rest):
                    continue
                replacement = (token, *tail)
                if replacement == tuple(ids[i:stop]):
                    continue
                estimate = first - float(cumulative[stop] - cumulative[i])
                key = (i, stop, replacement)
                if key not in edits:
                    edits[key] = Edit(i, stop, replacement, estimate)
                if not rest:
                    break  # the alternative ends on a boundary: a longer fragment is another edit's
    return sorted(edits.values(), key=lambda e: (-e.estimate, e.start, e.stop, e.ids))


def apply_edits(ids: Sequence[int], edits: Sequence[Edit]) -> list[int]:
    out, at = [], 0
    for edit in sorted(edits, key=lambda e: e.start):
        out.extend(ids[at : edit.start])
        out.extend(edit.ids)
        at = edit.stop
    out.extend(ids[at:])
    return out


def combinations(edits: Sequence[tuple[Edit, float]], beam: int, margin: float) -> list[tuple[Edit, ...]]:
    """Sets of two or more non-overlapping edits, by summed exact gain (``edits``: (edit, gain)), best first."""
    best = sorted(edits, key=lambda pair: -pair[1])[:COMBINE]
    sets = []
    for size in range(2, len(best) + 1):
        for chosen in itertools.combinations(best, size):
            spans = sorted((e.start, e.stop) for e, _ in chosen)
            if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
                continue
            gain = sum(g for _, g in chosen)
            if gain >= -margin:
                sets.append((gain, tuple(e for e, _ in chosen)))
    sets.sort(key=lambda pair: -pair[0])
    return [s for _, s in sets[:beam]]


def teacher_force(
    model: Any,
    contexts: Sequence[Sequence[int]],
    paths: Sequence[Sequence[int]],
    *,
    pad_id: int,
    temperature: float,
    top_k: int,
    top_p: float,
    batch_size: int,
    device: Any,
    alternatives: Sequence[Sequence[Sequence[int]]] | None = None,
) -> tuple[list[np.ndarray], list[list[dict[int, float]]]]:
    """Each path's per-token log p after its context under the sampling transform (no end event), and,
    where ``alternatives`` gives ids per path position, their log p at that position too."""
    import torch

    from natprints.likelihood.scorer import event_hidden, head_chunks, plan_batches, sampling_logits

    n = len(paths)
    if n == 0:
        return [], []
    longest = max(len(p) for p in paths)
    batches = plan_batches(
        contexts,
        paths,
        eos_id=pad_id,
        new_tokens=longest + 1,  # every row then ends with a pad event, which is dropped
        batch_size=batch_size,
        vocab_size=model.config.vocab_size,
    )
    logprobs: list[np.ndarray] = [np.zeros(0)] * n
    alt_out: list[list[dict[int, float]]] = [[{} for _ in p] for p in paths]
    with torch.inference_mode():
        for batch in batches:
            offsets = np.cumsum(batch.events) - np.asarray(batch.events)
            flat_pos, flat_id, owner = [], [], []
            if alternatives is not None:
                for b, row in enumerate(batch.rows):
                    for j, options in enumerate(alternatives[row]):
                        for token in options:
                            flat_pos.append(int(offsets[b]) + j)
                            flat_id.append(int(token))
                            owner.append((row, j, int(token)))
            alt_pos = torch.tensor(flat_pos, dtype=torch.long)
            alt_ids = torch.tensor(flat_id, dtype=torch.long)
            picked_parts, alt_values = [], np.zeros(len(flat_pos))
            targets = batch.targets.to(device)
            for span, logits in head_chunks(model, event_hidden(model, batch, device)):
                x = sampling_logits(logits, temperature, top_k, top_p)
                log_total = torch.logsumexp(x, dim=-1)
                picked_parts.append(x.gather(1, targets[span][:, None]).squeeze(1) - log_total)
                if len(flat_pos):
                    inside = ((alt_pos >= span.start) & (alt_pos < span.stop)).nonzero().squeeze(1)
                    if len(inside):
                        local = (alt_pos[inside] - span.start).to(device)
                        values = x[local, alt_ids[inside].to(device)] - log_total[local]
                        alt_values[inside.numpy()] = values.double().cpu().numpy()
            picked = torch.cat(picked_parts).double().cpu().numpy()
            for b, row in enumerate(batch.rows):
                start = int(offsets[b])
                logprobs[row] = picked[start : start + len(paths[row])]
            for (row, j, token), value in zip(owner, alt_values, strict=True):
                alt_out[row][j][token] = float(value)
    return logprobs, alt_out


@dataclass(frozen=True)
class StringScore:
    """A string scored over its segmentations: ``loglik`` = log of the summed probability of the
    ``paths`` distinct paths scored; ``canonical`` = the canonical path's log p alone."""

    loglik: float
    canonical: float
    paths: int
    best: tuple[int, ...]  # the most probable path found


def score_segmentations(
    model: Any,
    surf: Surfaces | None,
    tokenize: Any,
    contexts: Sequence[Sequence[int]],
    canonicals: Sequence[Sequence[int]],
    *,
    pad_id: int,
    temperature: float,
    top_k: int,
    top_p: float,
    batch_size: int,
    device: Any,
    beam: int = BEAM,
    margin: float = MARGIN,
    max_positions: int | None = None,
) -> list[StringScore]:
    """Each string (given as its canonical ids after its context) scored over its segmentations; see the
    module's note. ``beam`` 0 scores the canonical path only; a path that would not fit the model's
    ``max_positions`` after its context (longer than the canonical one) is not scored."""
    if beam < 0 or margin < 0:
        raise NatprintsError(f"segmentations: need beam >= 0 and margin >= 0, got {beam} and {margin}")
    forced = dict(
        pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size, device=device
    )
    searching = surf is not None and beam > 0
    options = [alternatives(surf, ids) if searching else [[] for _ in ids] for ids in canonicals]  # type: ignore[arg-type]
    base, alt = teacher_force(model, contexts, canonicals, alternatives=options if searching else None, **forced)
    found: list[dict[tuple[int, ...], float]] = [
        {tuple(ids): float(lp.sum())} for ids, lp in zip(canonicals, base, strict=True)
    ]
    if searching:
        assert surf is not None
        singles: list[list[Edit]] = []
        for ids, lp, alts in zip(canonicals, base, alt, strict=True):
            edits = single_edits(surf, tokenize, ids, lp, alts)
            singles.append([e for e in edits if e.estimate >= -margin][:beam])
        rounds = (model, contexts, canonicals)
        gains = _force_round(*rounds, [[(e,) for e in s] for s in singles], found, forced, max_positions)
        combos = [
            combinations([(sets[0], g) for sets, g in row.items() if g >= -margin], beam, margin) for row in gains
        ]
        _force_round(*rounds, combos, found, forced, max_positions)
    out = []
    for ids, paths in zip(canonicals, found, strict=True):
        canonical = paths[tuple(ids)]
        best = max(paths, key=lambda p: paths[p])
        out.append(StringScore(float(np.logaddexp.reduce(list(paths.values()))), canonical, len(paths), best))
    return out


def _force_round(
    model: Any,
    contexts: Sequence[Sequence[int]],
    canonicals: Sequence[Sequence[int]],
    edit_sets: Sequence[Sequence[tuple[Edit, ...]]],
    found: list[dict[tuple[int, ...], float]],
    forced: dict,
    max_positions: int | None,
) -> list[dict[tuple[Edit, ...], float]]:
    """Teacher-force each row's edit sets (paths not scored before, that fit ``max_positions``); record
    them in ``found`` and return each set's exact gain over the canonical path."""
    rows, ctx, paths, keys = [], [], [], []
    for r, sets in enumerate(edit_sets):
        for edits in sets:
            path = tuple(apply_edits(canonicals[r], edits))
            if path in found[r] or (max_positions and len(contexts[r]) + len(path) > max_positions):
                continue
            rows.append(r)
            ctx.append(contexts[r])
            paths.append(path)
            keys.append(edits)
    scored, _ = teacher_force(model, ctx, paths, **forced)
    gains: list[dict[tuple[Edit, ...], float]] = [{} for _ in edit_sets]
    for r, path, edits, lp in zip(rows, paths, keys, scored, strict=True):
        total = float(lp.sum())
        found[r][path] = total
        gains[r][edits] = total - found[r][tuple(canonicals[r])]
    return gains
