"""Which earlier positions of a token store end with the same n-gram as a query, newest first.

A position g stands for "the tokens up to and including g"; its reversed context (token g, g-1,
..., back to the start of its sequence, at most `max_depth` tokens) is a path in a trie: a node at
depth d is one d-gram, and every indexed position whose last d tokens spell it passes through it.
`insert(g)` walks g's path, `match(context)` walks the query's reversed suffix and returns the
deepest node (= the longest suffix of the query that occurs, capped at max_depth) with its
positions, newest first. Each position keeps one link per depth to the previous position through
the same node, so the newest `max_matches` occurrences are read in O(max_matches).
Path compression keeps memory near linear: a node one position passes through is a leaf whose
deeper path is read from the store itself; it is split only when a second position arrives.
Memory per indexed token: its token (the caller's list, or 4 bytes in the cache's array),
4 * max_depth bytes of links, at most one leaf node, plus one node per n-gram occurring at least
twice (a node: a dict entry and three list slots). A hashed n-gram table gives the same answers but needs max_depth entries per
token; a suffix automaton cannot forget the oldest text. `remove_oldest(g)` undoes `insert(g)`
for the oldest live position (collapsing nodes back to leaves), so a bounded cache evicts in
O(max_depth) per token. Costs: insert / remove O(max_depth), match O(max_depth + max_matches).
Token ids are ints in [0, 2**31); a negative value in the store marks a sequence boundary.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

_KEY_STRIDE = 1 << 32  # edge key = parent node * stride + token (token ids are < 2**32)
_ROOT = 0


class SuffixIndex:
    """A reversed-context trie over the positions of one growing token store (see module docstring).

    `tokens` is the store, indexed by `position - base`; the owner may replace it by a longer
    store with the same prefix (a request's token list) or trim its front (`drop_front`)."""

    def __init__(self, tokens: Sequence[int], max_depth: int) -> None:
        self.tokens = tokens
        self.base = 0  # position of tokens[0]
        self.live_start = 0  # positions below this were removed; links to them end a chain
        self.max_depth = max_depth
        self._edges: dict[int, int] = {}  # parent * stride + token -> child node
        self._count: list[int] = [0]  # live positions through each node
        self._last: list[int] = [-1]  # newest position through each node
        self._key: list[int] = [-1]  # the node's own edge key (to delete it)
        self._free: list[int] = []
        # links[(g - base) * max_depth + d - 1] = g - (previous position through g's depth-d node); 0: none
        self._links = array("i")
        self._zero_links = array("i", [0]) * max_depth
        self.num_steps = 0  # trie levels walked by insert(): the work done indexing

    @property
    def num_nodes(self) -> int:
        return len(self._count) - len(self._free) - 1

    def token(self, position: int) -> int:
        """The token at a position; -1 outside the store (before its start or past its end)."""
        index = position - self.base
        if 0 <= index < len(self.tokens):
            return self.tokens[index]
        return -1

    def reserve(self, end: int) -> None:
        """Make room for the links of positions below `end` (call before inserting them)."""
        missing = end - self.base - len(self._links) // self.max_depth
        if missing > 0:
            self._links.extend(self._zero_links * missing)

    def insert(self, position: int) -> None:
        """Index `position` (newer than every indexed one) along its reversed context."""
        edges, count, last, links, tokens = self._edges, self._count, self._last, self._links, self.tokens
        depth_limit = self.max_depth
        row = (position - self.base) * depth_limit - 1
        node = _ROOT
        for depth in range(1, depth_limit + 1):
            index = position - self.base - depth + 1  # < len(tokens): the position is in the store
            token = tokens[index] if index >= 0 else -1
            if token < 0:
                break  # the position's sequence starts here
            key = node * _KEY_STRIDE + token
            child = edges.get(key)
            if child is None:
                self._new_leaf(key, position, depth)
                break
            if count[child] == 1:  # a leaf: materialize its position's next level before sharing it
                older = last[child]
                older_token = self.token(older - depth) if depth < depth_limit else -1
                if older_token >= 0:
                    self._new_leaf(child * _KEY_STRIDE + older_token, older, depth + 1)
            count[child] += 1
            links[row + depth] = position - last[child]
            last[child] = position
            node = child
        self.num_steps += depth

    def match(self, context: Sequence[int], max_matches: int) -> tuple[int, list[int]]:
        """Longest suffix of `context` (at most max_depth tokens) ending at an indexed position:
        its length and up to `max_matches` of those positions, newest first; (0, []) if none."""
        edges, count, last, tokens = self._edges, self._count, self._last, self.tokens
        node, depth, leaf_position = _ROOT, 0, -1
        limit = min(self.max_depth, len(context))
        end = len(context) - 1
        while depth < limit:
            token = context[end - depth]
            if leaf_position >= 0:  # past a leaf: compare with its one position's context in the store
                index = leaf_position - self.base - depth  # < len(tokens): the leaf is in the store
                if index < 0 or tokens[index] != token:
                    break
                depth += 1
                continue
            child = edges.get(node * _KEY_STRIDE + token)
            if child is None:
                break
            node = child
            depth += 1
            if count[child] == 1:
                leaf_position = last[child]
        if depth == 0:
            return 0, []
        if leaf_position >= 0:
            return depth, [leaf_position]
        positions: list[int] = []
        links, live_start, stride = self._links, self.live_start, self.max_depth
        position = last[node]
        while position >= live_start and len(positions) < max_matches:
            positions.append(position)
            step = links[(position - self.base) * stride + depth - 1]
            if step == 0:
                break
            position -= step
        return depth, positions

    def remove_oldest(self, position: int) -> None:
        """Un-index `position`, which must be the oldest indexed one (a bounded cache's eviction)."""
        edges, count = self._edges, self._count
        path: list[int] = []
        node = _ROOT
        for depth in range(1, self.max_depth + 1):
            token = self.token(position - depth + 1)
            child = edges.get(node * _KEY_STRIDE + token) if token >= 0 else None
            if child is None:
                break
            path.append(child)
            node = child
            if count[child] == 1:
                break  # the position's own leaf
        for node in path:
            count[node] -= 1
        collapsed = next((depth for depth, node in enumerate(path, start=1) if count[node] == 1), 0)
        if collapsed:  # one position left there: it becomes a leaf again, its deeper nodes go
            parent = path[collapsed - 1]
            survivor = self._last[parent]
            for depth in range(collapsed, self.max_depth):
                token = self.token(survivor - depth)
                child = edges.get(parent * _KEY_STRIDE + token) if token >= 0 else None
                if child is None:
                    break
                self._delete(child)
                parent = child
        for node in path:
            if count[node] == 0 and self._key[node] >= 0:
                self._delete(node)

    def drop_front(self, end: int) -> None:
        """Forget the store's tokens and links below position `end` (all of them removed already)."""
        cut = end - self.base
        if cut <= 0:
            return
        del self.tokens[:cut]
        del self._links[: cut * self.max_depth]
        self.base = end

    def _new_leaf(self, key: int, position: int, depth: int) -> None:
        if self._free:
            node = self._free.pop()
            self._count[node], self._last[node], self._key[node] = 1, position, key
        else:
            node = len(self._count)
            self._count.append(1)
            self._last.append(position)
            self._key.append(key)
        self._edges[key] = node
        self._links[(position - self.base) * self.max_depth + depth - 1] = 0

    def _delete(self, node: int) -> None:
        del self._edges[self._key[node]]
        self._count[node], self._last[node], self._key[node] = 0, -1, -1
        self._free.append(node)
