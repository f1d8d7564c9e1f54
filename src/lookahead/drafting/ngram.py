"""Prompt n-gram lookup, plus the copy it follows: continue the text the output is copying from.

An index maps every n-gram (n <= max_ngram) of the context to its latest end position, kept up
to date as tokens arrive, so a lookup is a few dict reads. Besides that lookup it follows the copy
itself, as an editor reads a diff:

- the *copy pointer*: once the output has matched one place of the context for `MIN_RUN` tokens in a
  row, that place is where the next token most likely comes from, even where the latest occurrence
  of a short suffix is elsewhere (a docstring's second example, a repeated argument list);
- *resume points*: where the output stops copying (an edit: a renamed name, an inserted argument),
  the source resumes right where it stopped (an insertion) or one token later (a substitution), so
  both are proposed until the output lines up with one of them again (measured on code edits: after
  `has_close_elements_v2` the latest-suffix lookup proposed the instruction's text, 0 of 12 accepted,
  where the source's `(numbers: List[float], ...` was next).

Each draft is a chain that may run as deep as the budget allows. A suffix lookup's chain carries its
n-gram's confidence at every token; a copy or resume chain carries its kind's confidence at its first
token and `FOLLOW` after it: once the output has lined up with the source again, the rest is a copy.
A copy that has held for r tokens carries (r + 1) / (r + 2) instead where that is higher (the rule of
succession): on an edit copying a 100-token function, a fixed 0.9 a token let the tree's alternatives
take 9 of 24 nodes while the copy chain, cut at depth 15, was accepted whole.
"""
from __future__ import annotations

MIN_RUN = 4        # tokens copied in a row before a copy pointer is trusted
RESUME_WITHIN = 8  # tokens after an edit for which its resume points stay proposed
COPY_P, RESUME_P, SUBSTITUTE_P, FOLLOW = 0.9, 0.35, 0.25, 0.9


class NgramIndex:
    def __init__(self, max_ngram: int = 3, confidence: tuple[float, ...] = (0.5, 0.7, 0.85)) -> None:
        if max_ngram < 1 or len(confidence) < max_ngram:
            raise ValueError("need max_ngram >= 1 and one confidence per n-gram length")
        self.max_ngram, self.confidence = max_ngram, confidence
        self.context: list[int] = []
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> position right after its latest occurrence
        self.pending: dict[tuple[int, ...], int] = {}  # the current suffixes: indexed one token late
        self.copy: int | None = None   # context[copy] is the next token of the text being copied
        self.run = 0                   # tokens copied in a row from there
        self.broken: int | None = None  # where a trusted copy stopped (the source's next token then)
        self.since_break = 0

    def extend(self, tokens: list[int]) -> None:
        ctx = self.context
        for token in tokens:
            self._follow(token)
            # The suffixes ending at the previous token now have a continuation: index them.
            self.latest.update(self.pending)
            ctx.append(token)
            end = len(ctx)
            self.pending = {tuple(ctx[end - n:]): end for n in range(1, min(self.max_ngram, end) + 1)}
            if self.copy is None:  # start following the latest occurrence of the longest suffix
                pos = self.latest.get(tuple(ctx[-self.max_ngram:])) if end >= self.max_ngram else None
                self.copy, self.run = (pos, self.max_ngram) if pos is not None else (None, 0)

    def _follow(self, token: int) -> None:
        """Move the copy pointer over `token` (appended next), noting where a trusted copy breaks off."""
        ctx = self.context
        if self.broken is not None:
            self.since_break += 1
            for skip in (0, 1):  # the output lines up again after an insertion / a substitution
                if self.broken + skip < len(ctx) and ctx[self.broken + skip] == token:
                    self.copy, self.run, self.broken = self.broken + skip + 1, MIN_RUN, None
                    return
            if self.since_break > RESUME_WITHIN:
                self.broken = None
        if self.copy is not None and ctx[self.copy] == token:
            self.copy += 1
            self.run += 1
            return
        if self.copy is not None and self.run >= MIN_RUN:
            self.broken, self.since_break = self.copy, 0
        self.copy, self.run = None, 0

    @property
    def copy_run(self) -> int:
        """Tokens the output has copied in a row from one place of its context (0: not copying)."""
        return self.run if self.copy is not None else 0

    @property
    def copying(self) -> bool:
        """The output is copying a stretch of its context (a trusted copy pointer)."""
        return self.copy_run >= MIN_RUN

    def cursor(self) -> ChainCursor | None:
        """Chains from the copy pointer, the resume points of a recent edit and the continuation of the
        longest context suffix seen before; None if there is none."""
        ctx = self.context
        chains: list[Chain] = []
        if self.copying:
            # A copy that has held for r tokens goes on with probability (r + 1) / (r + 2) (the rule of
            # succession): a long copy's chain then outranks the tree's alternatives deep down.
            p = (self.run + 1) / (self.run + 2)
            chains.append((self.copy, max(COPY_P, p), max(FOLLOW, p), False))
        if self.broken is not None:
            chains += [(self.broken, RESUME_P, FOLLOW, True), (self.broken + 1, SUBSTITUTE_P, FOLLOW, True)]
        for n in range(min(self.max_ngram, len(ctx)), 0, -1):
            pos = self.latest.get(tuple(ctx[-n:]))
            if pos is not None:
                chains.append((pos, self.confidence[n - 1], self.confidence[n - 1], False))
                break
        chains = [c for c in chains if c[0] < len(ctx)]
        return ChainCursor(ctx, chains) if chains else None


# (position of the chain's next token, its confidence, the confidence of the tokens after it, whether it
# waits: a resume point stays where it is while the draft goes through an insertion it does not know)
Chain = tuple[int, float, float, bool]


class ChainCursor:
    """One or more chains of the context; chains that agree on a token move on together."""
    __slots__ = ("context", "chains")

    def __init__(self, context: list[int], chains: list[Chain]) -> None:
        self.context, self.chains = context, chains

    def next(self, limit: int) -> list[tuple[int, float]]:
        best: dict[int, float] = {}
        for pos, p, _, _ in self.chains:
            if pos < len(self.context):
                token = self.context[pos]
                best[token] = max(best.get(token, 0.0), p)
        return sorted(best.items(), key=lambda tp: -tp[1])[:max(limit, 0)]

    def child(self, token: int) -> ChainCursor | None:
        ctx = self.context
        merged: dict[int, Chain] = {}  # chains that met on the same position are one chain from here on
        for chain in self.chains:
            pos, p, follow, waits = chain
            if pos < len(ctx) and ctx[pos] == token:
                chain = (pos + 1, follow, follow, False)
            elif not waits:
                continue
            if chain[1] > merged.get(chain[0], (0, 0.0))[1]:
                merged[chain[0]] = chain
        return ChainCursor(ctx, list(merged.values())) if merged else None
