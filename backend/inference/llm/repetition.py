"""Spots a runaway answer: a small model that falls into a loop ("Mmmmmmm…", the same sentence
again and again) would fill its whole token allowance with it; providers end the answer instead.
"""

from __future__ import annotations

from collections import deque

MIN_REPEATS = 3  # a cycle seen this many times in a row is a loop, not a style


class RepetitionStop:
    """Fed the answer token by token; `runaway` once the last `window` tokens are one cycle of
    at most `window // MIN_REPEATS` tokens, repeated. A window of 0 never stops anything."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._tokens: deque[str] = deque(maxlen=max(window, 1))

    def add(self, token: str) -> bool:
        """Adds one token; True when the answer has become a loop."""
        if self._window <= 0:
            return False
        self._tokens.append(token)
        if len(self._tokens) < self._window:
            return False
        tokens = list(self._tokens)
        for cycle in range(1, self._window // MIN_REPEATS + 1):
            if all(tokens[i] == tokens[i - cycle] for i in range(cycle, self._window)):
                return True
        return False
