"""DraftState: everything drafting learns across requests, and its one file.

The shared trie, the recycle table, the fused-score calibration (what the sizing policy reads),
the per-source trust curves and what a sibling's share is worth live here; `Drafter` (drafter.py)
is one request's view of them.
`save`/`load` write and read all of it as one safetensors file (no pickle: loading someone else's
file runs no code) with a format version, a sha256 of the arrays, and the model and vocabulary it
was built for. A file that does not fit is refused with a `StateFileError` that says why; nothing
of it is used.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..files import replacing
from .calibration import Calibration
from .recycle import RecycleTable
from .trie import TokenTrie

SOURCES = ("prompt", "history", "recycle", "ngram")
# A source's token is believed accepted (given its parent was) at half its own probability until
# acceptance is observed: see calibration.py for what trusting cold scores cost.
TRUST_COLD = 0.5
FILE_FORMAT = "lookahead-draft-state"
FILE_VERSION = "2"


class StateFileError(ValueError):
    """A draft-state file that is not ours, is corrupted, or was built for another model."""


@dataclass
class SourceStats:
    proposed: int = 0   # draft nodes this source proposed
    accepted: int = 0   # of those, accepted by the model
    reached: int = 0    # of those, nodes whose parent was accepted (the verifier got to judge them)


@dataclass
class DraftState:
    trie: TokenTrie
    recycle: RecycleTable | None = None
    sources: tuple[str, ...] = SOURCES
    calibration: Calibration = field(default_factory=Calibration)  # fused score -> acceptance (for sizing)
    # Per source: its own probability -> P(accepted | parent accepted). Conditioning on the parent
    # judges one step of a source: a long chain is not blamed for the nodes beyond its first miss.
    trust: dict[str, Calibration] = field(default_factory=dict)
    # The share of probability a token's better siblings leave it -> P(accepted | parent accepted), for tokens
    # whose sources claim more than that share (see fusion.build_tree). Cold: the share itself.
    siblings: Calibration = field(default_factory=Calibration)
    stats: dict[str, SourceStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.sources) - set(SOURCES)
        if unknown or not self.sources:
            raise ValueError(f"unknown draft sources {sorted(unknown)}; choose from {SOURCES}")
        self.stats = {name: self.stats.get(name, SourceStats()) for name in self.sources}
        self.trust = {name: self.trust.get(name, Calibration(cold=TRUST_COLD)) for name in self.sources}

    def drafter(self, prompt: list[int]):
        from .drafter import Drafter
        return Drafter(self, prompt)

    # -- one file ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, model: str = "") -> None:
        """Write everything learned to `path` atomically (a crash mid-save leaves the old file)."""
        with self.trie.lock:
            arrays = {f"trie.{k}": v for k, v in self.trie.to_arrays().items()}
            if self.recycle is not None:
                arrays["recycle.tokens"], arrays["recycle.probs"] = self.recycle.tokens, self.recycle.probs
            for name, calib in {"calibration": self.calibration, "siblings": self.siblings,
                                **{f"trust.{k}": v for k, v in self.trust.items()}}.items():
                arrays[f"{name}.seen"] = torch.tensor(calib.seen, dtype=torch.float64)
                arrays[f"{name}.accepted"] = torch.tensor(calib.accepted, dtype=torch.float64)
        arrays = {k: v.contiguous() for k, v in arrays.items()}
        vocab = self.recycle.vocab_size if self.recycle is not None else None
        settings = {"max_match": self.trie.max_match, "window": self.trie.window, "model": model, "vocab": vocab}
        meta = {"format": FILE_FORMAT, "version": FILE_VERSION, "sha256": _digest(arrays),
                "settings": json.dumps(settings)}
        with replacing(Path(path)) as tmp:
            save_file(arrays, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, sources: tuple[str, ...] = SOURCES, capacity: int = 200_000,
             vocab_size: int | None = None, recycle_k: int = 8, model: str | None = None) -> DraftState:
        """Read a file written by `save`, checked against the model it will serve (`vocab_size`, `model`).

        Parts the file lacks start empty (e.g. a trie written by `lookahead warm` has no recycle table)."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            arrays = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise StateFileError(f"{path}: not a readable draft-state file ({e})") from e
        if meta.get("format") != FILE_FORMAT or meta.get("version") != FILE_VERSION:
            raise StateFileError(f"{path}: not a lookahead draft-state file (format {meta.get('format')!r}, "
                                 f"version {meta.get('version')!r}; expected {FILE_FORMAT!r} {FILE_VERSION!r})")
        if meta.get("sha256") != _digest(arrays):
            raise StateFileError(f"{path}: the file is corrupted (checksum mismatch)")
        try:
            return cls._from_arrays(arrays, meta, sources, capacity, vocab_size, recycle_k, model)
        except (ValueError, KeyError, TypeError) as e:  # checksum fine, content wrong: refuse it whole
            raise StateFileError(f"{path}: {e}") from None

    @classmethod
    def _from_arrays(cls, arrays, meta, sources, capacity, vocab_size, recycle_k, model) -> DraftState:
        settings = json.loads(meta.get("settings", "null"))
        if not isinstance(settings, dict):
            raise ValueError("its settings are missing")
        max_match, window = settings.get("max_match"), settings.get("window")
        if not (isinstance(max_match, int) and isinstance(window, int) and 1 <= max_match < window <= 1024):
            raise ValueError(f"its settings are invalid (max_match {max_match!r}, window {window!r})")
        built_for = settings.get("model") or ""
        if model and built_for and built_for != model:
            raise ValueError(f"it was built for model {built_for!r}, not {model!r}")
        if vocab_size is not None and settings.get("vocab") not in (None, vocab_size):
            raise ValueError(f"it was built for a vocabulary of {settings.get('vocab')} tokens, not {vocab_size}")
        trie_arrays = {k: arrays[f"trie.{k}"] for k in ("parents", "tokens", "counts")}
        if vocab_size is not None and trie_arrays["tokens"].numel() and int(trie_arrays["tokens"].max()) >= vocab_size:
            raise ValueError(f"its trie holds token ids beyond the model's vocabulary ({vocab_size})")
        trie = TokenTrie.from_arrays(trie_arrays, max_match, window, capacity)
        recycle = None
        if "recycle" in sources and vocab_size is not None:
            if "recycle.tokens" in arrays:
                recycle = RecycleTable.from_arrays(arrays["recycle.tokens"], arrays["recycle.probs"])
                if recycle.vocab_size != vocab_size:
                    raise ValueError(f"its recycle table has {recycle.vocab_size} rows, not {vocab_size}")
            else:
                recycle = RecycleTable(vocab_size, recycle_k)
        calibration = _calibration(arrays, "calibration")
        trust = {name: _calibration(arrays, f"trust.{name}", TRUST_COLD) for name in sources}
        return cls(trie, recycle, tuple(sources), calibration or Calibration(),
                   {k: v for k, v in trust.items() if v is not None},
                   siblings=_calibration(arrays, "siblings") or Calibration())


def _calibration(arrays: dict[str, torch.Tensor], name: str, cold: float = 1.0) -> Calibration | None:
    if f"{name}.seen" not in arrays:
        return None
    seen, accepted = arrays[f"{name}.seen"].tolist(), arrays[f"{name}.accepted"].tolist()
    if (not isinstance(seen, list) or len(seen) != len(accepted) or not seen
            or any(not math.isfinite(s) or not 0 <= a <= s for s, a in zip(seen, accepted, strict=True))):
        raise ValueError(f"its {name} counts are invalid")
    return Calibration(bins=len(seen), cold=cold, seen=seen, accepted=accepted)


def _digest(arrays: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(str(arrays[key].dtype).encode())
        h.update(arrays[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
