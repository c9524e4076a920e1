"""Generated text as the API returns it, piece by piece: stop sequences cut it (and end generation), and in
thinking mode what precedes `</think>` goes to `reasoning_content`, the rest to `content`. The same shaper
runs for streamed and whole answers, so the concatenated deltas always equal the whole answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from minicpmv_edge.runtime.model import THINK_END, THINK_START


def partial_suffix(text: str, needle: str) -> int:
    """The length of the longest end of `text` that is the start of `needle` (not all of it): what must be
    held back because the next piece could complete `needle`."""
    for length in range(min(len(text), len(needle) - 1), 0, -1):
        if needle.startswith(text[-length:]):
            return length
    return 0


class StopFilter:
    """Releases text that cannot be the start of a stop sequence; cuts at the first stop sequence."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [stop for stop in stops if stop]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop sequence was reached)."""
        self._pending += text
        found = [index for index in (self._pending.find(stop) for stop in self.stops) if index >= 0]
        if found:
            released, self._pending = self._pending[:min(found)], ""
            return released, True
        held = max((partial_suffix(self._pending, stop) for stop in self.stops), default=0)
        cut = len(self._pending) - held
        released, self._pending = self._pending[:cut], self._pending[cut:]
        return released, False

    def flush(self) -> str:
        released, self._pending = self._pending, ""
        return released


class ReasoningSplitter:
    """Thinking-mode output -> (reasoning, answer) pieces, as `split_reasoning` splits a whole output:
    everything before `</think>` (without `<think>` and surrounding whitespace) is reasoning, the answer
    starts at the first non-space after it. Outside thinking mode everything is answer, untouched."""

    def __init__(self, thinking: bool):
        self._in_reasoning = thinking
        self._answer_started = not thinking
        self._reasoning_started = False
        self._pending = ""

    def push(self, text: str) -> tuple[str, str]:
        self._pending += text
        reasoning = ""
        if self._in_reasoning:
            if THINK_END in self._pending:
                before, self._pending = self._pending.split(THINK_END, 1)
                reasoning = self._reasoning_piece(before.rstrip())
                self._in_reasoning = False
            else:
                held = max(partial_suffix(self._pending, THINK_END), partial_suffix(self._pending, THINK_START))
                # Trailing whitespace waits: it is dropped if </think> follows it.
                ready = self._pending[:len(self._pending) - held].rstrip()
                self._pending = self._pending[len(ready):]
                return self._reasoning_piece(ready), ""
        if not self._answer_started:
            self._pending = self._pending.lstrip()
            self._answer_started = bool(self._pending)
        answer, self._pending = self._pending, ""
        return reasoning, answer

    def _reasoning_piece(self, text: str) -> str:
        text = text.replace(THINK_START, "")
        if not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        return text

    def flush(self) -> str:
        """The reasoning an output that ended before `</think>` still held back (trailing whitespace
        dropped); after `</think>` nothing is ever held back."""
        rest, self._pending = self._pending, ""
        return self._reasoning_piece(rest.rstrip())


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


class AnswerShaper:
    """Raw generated pieces -> the API's deltas: stop sequences first (they apply to the raw text, as
    OpenAI's and llama.cpp's servers do), then the reasoning split."""

    def __init__(self, stops: Sequence[str], thinking: bool):
        self._stops = StopFilter(stops)
        self._split = ReasoningSplitter(thinking)
        self.stopped = False

    def push(self, text: str) -> Delta:
        released, self.stopped = self._stops.push(text)
        return Delta(*self._split.push(released))

    def finish(self) -> Delta:
        """The held-back rest once generation has ended (a stop sequence drops what followed it)."""
        released = "" if self.stopped else self._stops.flush()
        reasoning, content = self._split.push(released)
        return Delta(reasoning + self._split.flush(), content)
