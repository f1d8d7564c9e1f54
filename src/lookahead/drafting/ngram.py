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
  where the source's `(numbers: List[float], ...` was next);
- *edits learned*: where the output lines up again, at most two source tokens on, what it wrote in between
  replaced the source tokens it skipped (`,` written ` |` in a list rewritten as a table, a renamed parameter)
  or followed the source token before it (`_v2` after `has_close_elements`), and an edit made once is usually
  made again. Once seen twice an edit is offered wherever a chain walks over its source tokens, beside the
  source's own reading, and the copy pointer follows either reading (a few places at once, dropping those
  the output leaves), so a copy goes on across the edits it has seen: a table's rows after the first ones,
  every later use of a new name. (Lining up two tokens on can be chance: the pointer then follows untrusted
  until it has held `MIN_RUN` tokens.)

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
LEARN_WITHIN = 4    # the most tokens written at an edit that are learned as one
EDITS = 64          # learned edits kept per request (the latest)
SKIPS = (0, 1, 2)   # source tokens an edit replaced, as far as the output is seen to line up again
PLACES = 4          # places the copy pointer follows at once (readings with and without edits)


class Edit:
    """Source tokens (the key) the output wrote as `tokens`; how often it did (`hits`) and kept the source's
    reading (`misses`) where the copy pointer passed them since."""
    __slots__ = ("tokens", "hits", "misses")

    def __init__(self, tokens: tuple[int, ...]) -> None:
        self.tokens, self.hits, self.misses = tokens, 1, 0

    @property
    def p(self) -> float:
        """Chance the output makes it again: 0 until seen twice (one sighting is often chance: a numbered list's
        next number, a log line's other digits), then 1/2, 2/3, 3/4 ... with no miss."""
        return (self.hits - 1) / (self.hits + self.misses)


# Where a copy may go on: the position of its next source token, and the rest of an edit's tokens it is inside
# (they come first; the edit, to count whether the output made it).
Place = tuple[int, tuple[int, ...], "Edit | None"]


class NgramIndex:
    def __init__(self, max_ngram: int = 3, confidence: tuple[float, ...] = (0.5, 0.7, 0.85)) -> None:
        if max_ngram < 1 or len(confidence) < max_ngram:
            raise ValueError("need max_ngram >= 1 and one confidence per n-gram length")
        self.max_ngram, self.confidence = max_ngram, confidence
        self.context: list[int] = []
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> position right after its latest occurrence
        self.pending: dict[tuple[int, ...], int] = {}  # the current suffixes: indexed one token late
        self.places: list[Place] = []  # the copy pointer: where the copied text may go on, the source's reading first
        self.run = 0                   # tokens copied in a row
        self.broken: int | None = None  # where a trusted copy stopped (the source's next token then)
        self.since_break = 0
        self.edits: dict[tuple[int, ...], Edit] = {}  # source tokens -> what the output wrote instead
        self.firsts: dict[int, list[tuple[int, ...]]] = {}  # first source token -> its edits' keys

    def extend(self, tokens: list[int], output: bool = True) -> None:
        """Append `tokens`; `output=False` for the prompt: edits are learned from the output only (a prompt's
        lines, alike but not equal, are not edits)."""
        ctx = self.context
        for token in tokens:
            self._follow(token, output)
            # The suffixes ending at the previous token now have a continuation: index them.
            self.latest.update(self.pending)
            ctx.append(token)
            end = len(ctx)
            self.pending = {tuple(ctx[end - n:]): end for n in range(1, min(self.max_ngram, end) + 1)}
            if not self.places:  # start following the latest occurrence of the longest suffix
                pos = self.latest.get(tuple(ctx[-self.max_ngram:])) if end >= self.max_ngram else None
                if pos is not None:
                    self.places, self.run = [(pos, (), None)], self.max_ngram

    def _follow(self, token: int, learn: bool) -> None:
        """Move the copy pointer over `token` (appended next), noting where a trusted copy breaks off."""
        ctx = self.context
        if self.broken is not None:
            self.since_break += 1
            b = self.broken
            for skip in SKIPS:  # the output lines up again after an insertion / a substitution
                if b + skip < len(ctx) and ctx[b + skip] == token:
                    if learn and self.since_break <= LEARN_WITHIN and b > 0:
                        written = tuple(ctx[-self.since_break:])
                        # What was written replaced the skipped source tokens, or (none skipped) followed the one
                        # before them.
                        key = tuple(ctx[b: b + skip]) if skip else (ctx[b - 1],)
                        self._learn(key, written if skip else key + written)
                    # Two tokens on, lining up may be chance (a digit of another line): followed, not yet trusted.
                    self.places, self.run, self.broken = [(b + skip + 1, (), None)], MIN_RUN if skip < 2 else 1, None
                    return
            if self.since_break > RESUME_WITHIN:
                self.broken = None
        if self.places:
            moved = self._count(token)
            if moved:
                self.places = moved[:PLACES]
                self.run += 1
                return
            if self.run >= MIN_RUN:
                self.broken, self.since_break = self.places[0][0], 0
        self.places, self.run = [], 0

    def _count(self, token: int) -> list[Place]:
        """The pointer's places after `token`; each edit passed counts as made (a hit) or not (a miss)."""
        out = []
        for pos, within, edit in self.places:
            moved = self.moves(pos, within, token)
            if within:  # inside `edit`: made when its last token comes
                if moved:
                    edit.hits += len(within) == 1
                else:
                    edit.misses += 1
                edits = [edit] * len(moved)
            else:
                taken = [e for _, _, e in moved]
                for _, e in self.edits_at(pos):
                    if all(e is not t for t in taken):
                        e.misses += 1
                    elif len(e.tokens) == 1:
                        e.hits += 1
                edits = taken
            out += [(q, rest, e if rest else None) for (q, rest, _), e in zip(moved, edits, strict=True)]
        return list(dict.fromkeys(out))

    def moves(self, pos: int, within: tuple[int, ...], token: int, least: float = -1.0
              ) -> list[tuple[int, tuple[int, ...], Edit | None]]:
        """Where a copy at source position `pos` (after the rest of an edit, `within`) goes on over `token`: the
        source's own reading first, then each learned edit there (chance above `least`) that starts with `token`,
        with that edit. The copy pointer and the drafted chains move by this one rule."""
        if within:
            return [(pos, within[1:], None)] if within[0] == token else []
        ctx = self.context
        out = [(pos + 1, (), None)] if pos < len(ctx) and ctx[pos] == token else []
        return out + [(pos + len(key), e.tokens[1:], e) for key, e in self.edits_at(pos, least) if e.tokens[0] == token]

    def _learn(self, key: tuple[int, ...], tokens: tuple[int, ...]) -> None:
        edit = self.edits.get(key)
        if edit is not None and edit.tokens == tokens:
            edit.hits += 1
            return
        if edit is None:
            if len(self.edits) >= EDITS:  # forget the oldest
                old = next(iter(self.edits))
                del self.edits[old]
                self.firsts[old[0]].remove(old)
            self.firsts.setdefault(key[0], []).append(key)
        self.edits[key] = Edit(tokens)

    def edits_at(self, pos: int, least: float = -1.0) -> list[tuple[tuple[int, ...], Edit]]:
        """Learned edits of the source tokens at `pos` (with p above `least`)."""
        ctx = self.context
        keys = self.firsts.get(ctx[pos]) if pos < len(ctx) else None
        if not keys:
            return []
        return [(key, self.edits[key]) for key in keys
                if self.edits[key].p > least and tuple(ctx[pos: pos + len(key)]) == key]

    @property
    def copy_run(self) -> int:
        """Tokens the output has copied in a row from one place of its context (0: not copying)."""
        return self.run if self.places else 0

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
            chains += [(pos, max(COPY_P, p), max(FOLLOW, p), False, within) for pos, within, _ in self.places]
        if self.broken is not None:
            chains += [(self.broken, RESUME_P, FOLLOW, True, ()), (self.broken + 1, SUBSTITUTE_P, FOLLOW, True, ())]
        for n in range(min(self.max_ngram, len(ctx)), 0, -1):
            pos = self.latest.get(tuple(ctx[-n:]))
            if pos is not None:
                chains.append((pos, self.confidence[n - 1], self.confidence[n - 1], False, ()))
                break
        chains = [c for c in chains if c[0] < len(ctx) or c[4]]
        return ChainCursor(self, chains) if chains else None


# (position of the chain's next source token, its confidence, the confidence of the tokens after it, whether
# it waits: a resume point stays where it is while the draft goes through an insertion it does not know, the
# rest of an edit's tokens the chain is inside: they come before the source's)
Chain = tuple[int, float, float, bool, tuple[int, ...]]


class ChainCursor:
    """One or more chains of the context; chains that agree on a token move on together. Where a chain's source
    tokens have an edit seen twice or more, it offers both readings, the edit's with its chance."""
    __slots__ = ("index", "chains")

    def __init__(self, index: NgramIndex, chains: list[Chain]) -> None:
        self.index, self.chains = index, chains

    def next(self, limit: int) -> list[tuple[int, float]]:
        ctx, best = self.index.context, {}
        for pos, p, _, _, within in self.chains:
            if within:
                options = [(within[0], p)]
            elif pos < len(ctx):
                # An edit starting with the source's token (an insertion after it) parts from it one token later.
                edits = [e for _, e in self.index.edits_at(pos, 0.0) if e.tokens[0] != ctx[pos]]
                options = [(e.tokens[0], p * e.p) for e in edits]
                options.append((ctx[pos], p * (1.0 - max((e.p for e in edits), default=0.0))))
            else:
                continue
            for token, q in options:
                best[token] = max(best.get(token, 0.0), q)
        return sorted(best.items(), key=lambda tp: -tp[1])[:max(limit, 0)]

    def child(self, token: int) -> ChainCursor | None:
        ctx = self.index.context
        merged: dict[tuple, Chain] = {}  # chains that met on the same place are one chain from here on
        for chain in self.chains:
            pos, _, follow, waits, within = chain
            moved = self.index.moves(pos, within, token, 0.0)
            # An edit starting with the source's own token (an insertion after it) parts from the source's reading
            # at the next token: the two share its chance there.
            shared = not within and pos < len(ctx) and ctx[pos] == token
            made = max((e.p for _, _, e in moved if e is not None), default=0.0)
            # The edits' readings first: at an even chance, the draft offers the edit the output made last time.
            children = [(q, follow * ((e.p if shared else 1.0) if e is not None else 1.0 - made), follow, False, rest)
                        for q, rest, e in sorted(moved, key=lambda m: m[2] is None)] or ([chain] if waits else [])
            for child in children:
                place = child[0], child[4]
                if child[1] > merged.get(place, (0, 0.0))[1]:
                    merged[place] = child
        return ChainCursor(self.index, list(merged.values())) if merged else None
