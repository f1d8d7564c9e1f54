"""TokenTrie: the Lookahead cache of token n-grams, frequency-ranked and bounded.

Every window of `window` tokens that passes through a scope is counted along one trie path,
so a node's count is the number of times its n-gram occurred. Two scopes:

- the *shared* scope (one per TokenTrie) learns from every accepted output and persists
  across requests; a node cap keeps it bounded (counts are halved and rare n-grams dropped);
- the *request* scope (one per TrieSession) holds the prompt and this request's output and is
  dropped with the session, so nothing of one prompt leaks into the next request. It keeps the
  stream and where each token and pair ends, not nodes, and reads the same counts off that.

Retrieval matches the longest suffix of the context (up to `max_match` tokens) in each scope
and hands the fused tree builder (fusion.py) one cursor per scope: continuations ranked by count.
"""
from __future__ import annotations

import heapq
import threading

import torch


class _Node:
    __slots__ = ("count", "total", "children")

    def __init__(self) -> None:
        self.count = 0  # occurrences of the n-gram ending here
        self.total = 0  # sum of the children's counts: the denominator of their probabilities
        self.children: dict[int, _Node] = {}


class _Scope:
    """One trie plus its node count; `epoch` changes whenever nodes are removed."""

    def __init__(self) -> None:
        self.root = _Node()
        self.size = 0
        self.epoch = 0

    def match(self, context: list[int], max_match: int) -> _Node | None:
        """Deepest node reached by the longest context suffix (<= max_match) that has continuations."""
        for m in range(min(max_match, len(context)), 0, -1):
            node = self.root
            for token in context[-m:]:
                node = node.children.get(token)
                if node is None:
                    break
            if node is not None and node.total:
                return node
        return None


class _Feeder:
    """Counts every window of a token stream into a scope, one token at a time.

    Open cursors hold the end node of each window still growing, so a stream can be fed
    in pieces (prompt, then each step's accepted tokens) without counting anything twice.
    """

    def __init__(self, scope: _Scope, window: int) -> None:
        self.scope, self.window = scope, window
        self.cursors: list[tuple[_Node, int]] = []
        self.epoch = scope.epoch

    def feed(self, tokens: list[int]) -> None:
        scope = self.scope
        if self.epoch != scope.epoch:  # nodes were evicted: open cursors may be detached
            self.cursors, self.epoch = [], scope.epoch
        for token in tokens:
            grown = []
            for node, depth in [*self.cursors, (scope.root, 0)]:
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node()
                    scope.size += 1
                child.count += 1
                node.total += 1
                if depth + 1 < self.window:
                    grown.append((child, depth + 1))
            self.cursors = grown


class NodeCursor:
    """A position in a scope, for the tree builder: continuations ranked by count.

    `escape`: counts held back for a continuation the scope has not seen (PPM's escape method A: a token seen c
    times of n is proposed at c / (n + 1)). The shared scope uses 1: what other requests wrote once after these
    tokens is a guess for this one, not a certainty (measured: Qwen2.5-Coder-1.5B edits with the trie warmed on
    eight other edits' answers took 49 steps at c / n, 43 at c / (n + 1), 41 cold)."""
    __slots__ = ("node", "escape")

    def __init__(self, node: _Node, escape: int = 0) -> None:
        self.node, self.escape = node, escape

    def next(self, limit: int) -> list[tuple[int, float]]:
        node = self.node
        top = heapq.nlargest(limit, node.children.items(), key=lambda kv: kv[1].count)
        return [(token, child.count / (node.total + self.escape)) for token, child in top]

    def child(self, token: int) -> NodeCursor | None:
        child = self.node.children.get(token)
        return NodeCursor(child, self.escape) if child is not None and child.total else None


SHARED_ESCAPE = 1  # see NodeCursor
RECENT = 64  # occurrences of a request's token pair (or token) a match reads, the latest


class _Text:
    """A request's scope: its token stream and where each token and token pair ends in it.

    It answers what a trie of the stream's `window`-token windows would (`TextCursor` reads the counts off the
    positions), but feeding costs two list appends a token where the trie creates up to `window` nodes (a 4,000-token
    prompt: 1.5 ms and 0.8 MiB against ~50 ms and 15 MiB). Only a pair's or token's latest RECENT occurrences are
    read: a text repeating itself would otherwise cost a proposal its occurrences (2.6 ms at 8,000 tokens of one
    repeated phrase, 0.35 ms at 1,000), where a trie counts them all at no cost to read."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.tokens: list[int] = []
        self.singles: dict[int, list[int]] = {}            # token -> end positions (index after it)
        self.pairs: dict[tuple[int, int], list[int]] = {}  # token pair -> end positions

    def feed(self, tokens: list[int]) -> None:
        stream, singles, pairs = self.tokens, self.singles, self.pairs
        for token in tokens:
            if stream:
                pairs.setdefault((stream[-1], token), []).append(len(stream) + 1)
            stream.append(token)
            singles.setdefault(token, []).append(len(stream))

    def match(self, context: list[int], max_match: int) -> TextCursor | None:
        """The longest context suffix (<= max_match tokens) that occurs followed by a token, as `_Scope.match`."""
        stream, n = self.tokens, len(self.tokens)
        longest = min(max_match, len(context))
        if longest >= 2:
            # Every occurrence of the last pair, with how far back it matches the context (up to `longest`).
            found: list[tuple[int, int]] = []
            for end in self.pairs.get((context[-2], context[-1]), [])[-RECENT:]:
                if end < n:
                    m = 2
                    while m < longest and end > m and stream[end - m - 1] == context[-m - 1]:
                        m += 1
                    found.append((end, m))
            if found:
                m = max(m for _, m in found)
                return TextCursor(self, [end for end, k in found if k == m], m)
        if longest >= 1:
            ends = [end for end in self.singles.get(context[-1], [])[-RECENT:] if end < n]
            if ends:
                return TextCursor(self, ends, 1)
        return None


class TextCursor:
    """A position in a request's scope: the ends of every occurrence of the n-gram read so far (`depth` tokens)."""
    __slots__ = ("text", "ends", "depth")

    def __init__(self, text: _Text, ends: list[int], depth: int) -> None:
        self.text, self.ends, self.depth = text, ends, depth

    def next(self, limit: int) -> list[tuple[int, float]]:
        stream = self.text.tokens
        counts: dict[int, int] = {}  # first occurrence first: ties rank as the trie's insertion order does
        for end in self.ends:
            counts[stream[end]] = counts.get(stream[end], 0) + 1
        top = heapq.nlargest(limit, counts.items(), key=lambda kv: kv[1])
        return [(token, count / len(self.ends)) for token, count in top]

    def child(self, token: int) -> TextCursor | None:
        # A window of the trie holds `window` tokens: the n-gram it ends with has no continuation counted.
        if self.depth + 1 >= self.text.window:
            return None
        stream, n = self.text.tokens, len(self.text.tokens)
        ends = [end + 1 for end in self.ends if stream[end] == token and end + 1 < n]
        return TextCursor(self.text, ends, self.depth + 1) if ends else None


class TokenTrie:
    """The shared scope and its settings; `session(prompt)` opens a request."""

    def __init__(self, max_match: int = 4, window: int = 16, capacity: int = 200_000) -> None:
        if not 1 <= max_match < window:
            raise ValueError("need 1 <= max_match < window")
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.max_match, self.window, self.capacity = max_match, window, capacity
        self.shared = _Scope()
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return self.shared.size

    def session(self, prompt: list[int]) -> TrieSession:
        return TrieSession(self, prompt)

    def insert(self, tokens: list[int]) -> None:
        """Count a whole sequence into the shared scope (warm-up from a corpus)."""
        with self.lock:
            _Feeder(self.shared, self.window).feed(list(tokens))
            self._bound()

    def _bound(self) -> None:
        """Keep the shared scope under `capacity`: halve all counts, drop what falls to zero."""
        scope = self.shared
        while scope.size > self.capacity:
            scope.size = _decay(scope.root)
            scope.epoch += 1

    # -- persistence (the file itself is DraftState's: one file for everything drafting learns)
    def to_arrays(self) -> dict[str, torch.Tensor]:
        """Breadth-first node arrays of the shared scope: parent index (-1 = root), token, count."""
        with self.lock:
            parents, tokens, counts = _flatten(self.shared.root)
        return {"parents": torch.tensor(parents, dtype=torch.int64), "tokens": torch.tensor(tokens, dtype=torch.int64),
                "counts": torch.tensor(counts, dtype=torch.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor], max_match: int, window: int,
                    capacity: int = 200_000) -> TokenTrie:
        """The inverse of `to_arrays`; ValueError names what is inconsistent."""
        trie = cls(max_match=max_match, window=window, capacity=capacity)
        trie.shared.size = _unflatten(trie.shared.root, arrays)
        trie._bound()
        return trie


class TrieSession:
    """One request's drafter: its own prompt scope plus the shared scope of its TokenTrie."""

    def __init__(self, trie: TokenTrie, prompt: list[int]) -> None:
        self.trie = trie
        self.request = _Text(trie.window)
        self.request.feed(list(prompt))
        self._shared_feed = _Feeder(trie.shared, trie.window)
        with trie.lock:
            # Lead-in so the shared scope learns how outputs start after a prompt's last tokens.
            self._shared_feed.feed(list(prompt[-trie.max_match:]))

    def observe(self, tokens: list[int], **_feedback) -> None:
        """Accepted tokens: counted into this request's scope and the shared scope (other feedback unused)."""
        self.request.feed(tokens)
        with self.trie.lock:
            self._shared_feed.feed(tokens)
            self.trie._bound()

    def cursors(self, context: list[int]) -> dict[str, NodeCursor | TextCursor | None]:
        """Root cursors of both scopes for the tree builder (call with `trie.lock` held)."""
        request = self.request.match(context, self.trie.max_match)
        shared = self.trie.shared.match(context, self.trie.max_match)
        return {"prompt": request, "history": shared and NodeCursor(shared, SHARED_ESCAPE)}


def _decay(root: _Node) -> int:
    """Halve every count, drop nodes that fall to zero; returns the remaining node count."""
    size = 0
    stack = [root]
    while stack:
        node = stack.pop()
        node.total = 0
        kept = {}
        for token, child in node.children.items():
            child.count //= 2
            if child.count:
                kept[token] = child
                node.total += child.count
        node.children = kept
        size += len(kept)
        stack.extend(kept.values())
    return size


def _flatten(root: _Node) -> tuple[list[int], list[int], list[int]]:
    """Breadth-first arrays: parent index (-1 = root), token, count; parents precede children."""
    parents, tokens, counts = [], [], []
    queue = [(-1, root)]
    for index, (_, node) in enumerate(queue):
        for token, child in node.children.items():
            parents.append(index - 1)
            tokens.append(token)
            counts.append(child.count)
            queue.append((index, child))
    return parents, tokens, counts


def _unflatten(root: _Node, arrays: dict[str, torch.Tensor]) -> int:
    if any(arrays[k].dtype.is_floating_point or arrays[k].dim() != 1 for k in ("parents", "tokens", "counts")):
        raise ValueError("trie arrays must be 1-D integer arrays")
    parents, tokens, counts = (arrays[k].tolist() for k in ("parents", "tokens", "counts"))
    if not len(parents) == len(tokens) == len(counts):
        raise ValueError("trie arrays differ in length")
    nodes: list[_Node] = []
    for i, (p, t, c) in enumerate(zip(parents, tokens, counts, strict=True)):
        if not -1 <= p < i or c <= 0 or t < 0:
            raise ValueError(f"trie node {i} is inconsistent (parent {p}, token {t}, count {c})")
        parent = root if p < 0 else nodes[p]
        child = _Node()
        child.count = c
        parent.children[t] = child
        parent.total += c
        nodes.append(child)
    return len(nodes)
