"""TokenTrie: the Lookahead cache of token n-grams, frequency-ranked and bounded.

Every window of `window` tokens that passes through a scope is counted along one trie path,
so a node's count is the number of times its n-gram occurred. Two scopes:

- the *shared* scope (one per TokenTrie) learns from every accepted output and persists
  across requests; a node cap keeps it bounded (counts are halved and rare n-grams dropped);
- the *request* scope (one per TrieSession) holds the prompt and this request's output and is
  dropped with the session, so nothing of one prompt leaks into the next request.

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
    """A position in a scope, for the tree builder: continuations ranked by count."""
    __slots__ = ("node",)

    def __init__(self, node: _Node) -> None:
        self.node = node

    def next(self, limit: int) -> list[tuple[int, float]]:
        node = self.node
        top = heapq.nlargest(limit, node.children.items(), key=lambda kv: kv[1].count)
        return [(token, child.count / node.total) for token, child in top]

    def child(self, token: int) -> NodeCursor | None:
        child = self.node.children.get(token)
        return NodeCursor(child) if child is not None and child.total else None


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
        self._request: _Scope | None = None
        self._unfed: list[int] = list(prompt)  # this request's tokens, until its scope is first read
        self._shared_feed = _Feeder(trie.shared, trie.window)
        with trie.lock:
            # Lead-in so the shared scope learns how outputs start after a prompt's last tokens.
            self._shared_feed.feed(list(prompt[-trie.max_match:]))

    @property
    def request(self) -> _Scope:
        """This request's scope, counted when first read: a request that never drafts (drafting off, the guard's
        verdict in a large batch) does not count its prompt (~5 ms a request, 40 mixed prompts, SmolLM2's window)."""
        if self._request is None:
            self._request = _Scope()
            self._request_feed = _Feeder(self._request, self.trie.window)
            self._request_feed.feed(self._unfed)
            self._unfed = []
        return self._request

    def observe(self, tokens: list[int], **_feedback) -> None:
        """Accepted tokens: counted into this request's scope and the shared scope (other feedback unused)."""
        if self._request is None:
            self._unfed.extend(tokens)
        else:
            self._request_feed.feed(tokens)
        with self.trie.lock:
            self._shared_feed.feed(tokens)
            self.trie._bound()

    def cursors(self, context: list[int]) -> dict[str, NodeCursor | None]:
        """Root cursors of both scopes for the tree builder (call with `trie.lock` held)."""
        request = self.request.match(context, self.trie.max_match)
        shared = self.trie.shared.match(context, self.trie.max_match)
        return {"prompt": request and NodeCursor(request), "history": shared and NodeCursor(shared)}


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
