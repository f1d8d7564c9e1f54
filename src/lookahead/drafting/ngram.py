"""Prompt n-gram lookup: continue the most recent earlier occurrence of the context's suffix.

An index maps every n-gram (n <= max_ngram) of the context to its latest end position, kept up
to date as tokens arrive, so a lookup is a few dict reads. The draft is one chain that may run
as deep as the budget allows (copying long spans is where it shines).
"""
from __future__ import annotations


class NgramIndex:
    def __init__(self, max_ngram: int = 3, confidence: tuple[float, ...] = (0.5, 0.7, 0.85)) -> None:
        if max_ngram < 1 or len(confidence) < max_ngram:
            raise ValueError("need max_ngram >= 1 and one confidence per n-gram length")
        self.max_ngram, self.confidence = max_ngram, confidence
        self.context: list[int] = []
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> position right after its latest occurrence
        self.pending: dict[tuple[int, ...], int] = {}  # the current suffixes: indexed one token late

    def extend(self, tokens: list[int]) -> None:
        ctx = self.context
        for token in tokens:
            # The suffixes ending at the previous token now have a continuation: index them.
            self.latest.update(self.pending)
            ctx.append(token)
            end = len(ctx)
            self.pending = {tuple(ctx[end - n:]): end for n in range(1, min(self.max_ngram, end) + 1)}

    def cursor(self) -> ChainCursor | None:
        """Continuation of the longest context suffix seen before, or None."""
        ctx = self.context
        for n in range(min(self.max_ngram, len(ctx)), 0, -1):
            pos = self.latest.get(tuple(ctx[-n:]))
            if pos is not None:
                return ChainCursor(ctx, pos, self.confidence[n - 1])
        return None


class ChainCursor:
    __slots__ = ("context", "pos", "p")

    def __init__(self, context: list[int], pos: int, p: float) -> None:
        self.context, self.pos, self.p = context, pos, p

    def next(self, limit: int) -> list[tuple[int, float]]:
        return [(self.context[self.pos], self.p)] if self.pos < len(self.context) and limit > 0 else []

    def child(self, token: int) -> ChainCursor | None:
        if self.pos < len(self.context) and self.context[self.pos] == token:
            return ChainCursor(self.context, self.pos + 1, self.p)
        return None
