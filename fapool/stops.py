"""Stop-string matching whose cost per token does not grow with the number of stop strings.

The stop strings go into one trie of their reversed text. After a token adds characters, each new
end position walks that trie backwards through the text: the walk ends at the first character no
stop string has there, so a step costs (new characters) x (at most the longest stop string), and
usually one dictionary lookup per new character, whether a request has 1 or 64 stop strings.
"""
from __future__ import annotations

from collections.abc import Iterable

_END = ""  # key of a trie node that completes a stop string (no real character is empty)


class StopMatcher:
    def __init__(self, stops: Iterable[str]) -> None:
        self.root: dict = {}
        self.max_len = 0
        for s in stops:
            assert s, "empty stop strings are refused by SamplingParams"
            node = self.root
            for ch in reversed(s):
                node = node.setdefault(ch, {})
            node[_END] = True
            self.max_len = max(self.max_len, len(s))

    def __bool__(self) -> bool:
        return bool(self.root)

    def find(self, text: str, new_from: int) -> int:
        """Start of the first stop string in `text` that ends past index `new_from` (earlier ends
        were checked by earlier calls), or -1. Of stop strings ending at the same place the
        longest wins, so the cut hides all of it."""
        if not self.root:
            return -1
        for end in range(max(new_from, 0), len(text)):
            node, i, start = self.root, end, -1
            while i >= 0:
                node = node.get(text[i])
                if node is None:
                    break
                if _END in node:
                    start = i
                i -= 1
            if start >= 0:
                return start
        return -1
