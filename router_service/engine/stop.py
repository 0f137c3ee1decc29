"""Stop strings over streamed text: cut exactly before the first stop, never emit a partial one."""

from __future__ import annotations


class StopChecker:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""  # text held back because it could be the start of a stop string

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return delta, False
        buffer = self.pending + delta
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buffer[: min(hits)], True
        keep = self._held_suffix(buffer)
        self.pending = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text

    def _held_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest
