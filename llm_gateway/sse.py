"""Server-Sent Events: an incremental decoder for upstream streams and an encoder for ours.

The decoder follows the WHATWG event-stream grammar (HTML §9.2.6): lines end with CRLF, LF
or CR (and nothing else, unlike `str.splitlines()` / httpx `aiter_lines()`, which also split
on U+2028 and friends and so break JSON payloads), lines are cut on bytes before UTF-8
decoding (a code point split across reads is reassembled), `:` lines are comments, one
space after the field's colon is dropped, `data` lines are joined with "\\n", a blank line
dispatches, and an event with no `data` line dispatches nothing. The `id` persists across
events (ignored if it contains NUL); `retry` takes digits only.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

__all__ = ["SSEDecoder", "SSEEvent", "SSEEventTooLarge", "encode_comment", "encode_event"]

_EOL = re.compile(rb"\r\n|\r|\n")
_MAX_RETRY_DIGITS = 10  # int() of thousands of digits is slow, and refused past 4300
_encode = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps() would make one per call


class SSEEventTooLarge(ValueError):
    """The event being received grew past the decoder's `max_event_bytes`. `events`: the
    complete ones the same `feed()` decoded before it (they are the peer's valid output)."""

    def __init__(self, message: str, events: list[SSEEvent] | None = None) -> None:
        super().__init__(message)
        self.events = events or []


class SSEEvent(NamedTuple):
    """One dispatched event (a tuple: made once per upstream chunk, a frozen dataclass's
    __init__ costs several times as much)."""

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class SSEDecoder:
    """Feed raw bytes in any split; get complete events back.

    >>> d = SSEDecoder()
    >>> d.feed(b"data: a\\r") + d.feed(b"\\n\\r\\n")
    [SSEEvent(data='a', event='message', id='', retry=None)]

    Call `finish()` at EOF: it reports whether an unterminated event was dropped.

    With `max_event_bytes`, `feed()` raises `SSEEventTooLarge` once the event being received
    (its data lines plus the unterminated line) is larger: a peer sending one endless line
    must not take all the memory. The exception carries the events decoded before it.
    """

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self.max_event_bytes = max_event_bytes
        self._data_bytes = 0  # raw size of the data lines of the pending event
        self._line = bytearray()  # bytes of the current, not yet terminated line
        self._skip_lf = False  # the previous read ended in CR: a leading LF belongs to it
        self._first_line = True  # strip a BOM from the very first line only
        self._data: list[str] = []
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None

    @property
    def last_event_id(self) -> str:
        return self._last_id

    @property
    def has_pending_event(self) -> bool:
        """True if fields of an undispatched event (or a partial non-comment line) are buffered."""
        if self._data or self._event:
            return True
        return bool(self._line) and not self._line.startswith(b":")

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if not chunk:
            return events
        pos = 0
        if self._skip_lf:
            # A CR ended the previous read and its line was already handled at once (no
            # need to wait): an LF right after it is the second half of a CRLF.
            self._skip_lf = False
            if chunk[:1] == b"\n":
                pos = 1
        try:
            if b"\r" in chunk:
                lines = None
                for match in _EOL.finditer(chunk, pos):
                    self._line += chunk[pos:match.start()]
                    pos = match.end()
                    line = bytes(self._line)
                    self._line.clear()
                    event = self._process_line(line)
                    if event is not None:
                        events.append(event)
            else:  # LF only, as nearly every server sends: split once instead of a search per line
                lines = chunk[pos:].split(b"\n") if pos else chunk.split(b"\n")
                if self._line:
                    lines[0] = bytes(self._line) + lines[0]
                    self._line.clear()
                rest = lines.pop()
                self._lines(lines, events)
        except SSEEventTooLarge as exc:
            exc.events = events
            raise
        if lines is None:
            self._line += chunk[pos:]
            if chunk.endswith(b"\r"):
                self._skip_lf = True
        else:
            self._line += rest
        if self.max_event_bytes is not None and len(self._line) + self._data_bytes > self.max_event_bytes:
            raise SSEEventTooLarge(f"an SSE event is larger than {self.max_event_bytes} bytes", events)
        return events

    def _lines(self, lines: list[bytes], events: list[SSEEvent]) -> None:
        """Complete lines: a stream's usual two (`data: ...` and the blank one) decided
        here, anything else by `_process_line`."""
        for line in lines:
            if not line:
                if self._data:
                    events.append(self._dispatch())
                else:
                    self._event = ""
                    self._first_line = False
            elif line[:6] == b"data: " and not self._first_line:
                self._data.append(line[6:].decode("utf-8", errors="replace"))
                if self.max_event_bytes is not None:
                    self._data_bytes += len(line)
                    if self._data_bytes > self.max_event_bytes:
                        raise SSEEventTooLarge(f"an SSE event is larger than {self.max_event_bytes} bytes")
            else:
                event = self._process_line(line)
                if event is not None:
                    events.append(event)

    def finish(self) -> bool:
        """Signal EOF. Returns True if an unterminated event was left (and is discarded)."""
        pending = self.has_pending_event
        self._line.clear()
        self._data = []
        self._data_bytes = 0
        self._event = ""
        self._skip_lf = False
        return pending

    def _process_line(self, raw: bytes) -> SSEEvent | None:
        line = raw.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
            if self.max_event_bytes is not None:
                self._data_bytes += len(raw)
                if self._data_bytes > self.max_event_bytes:
                    raise SSEEventTooLarge(f"an SSE event is larger than {self.max_event_bytes} bytes")
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\x00" not in value:
                self._last_id = value
        elif field == "retry":
            if value.isascii() and value.isdigit() and len(value) <= _MAX_RETRY_DIGITS:
                self._retry = int(value)
        # Any other field is ignored, as the grammar says.
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(data="\n".join(self._data), event=self._event or "message",
                         id=self._last_id, retry=self._retry)
        self._data = []
        self._data_bytes = 0
        self._event = ""
        return event


def encode_event(event: str, data: dict[str, Any], event_id: int) -> bytes:
    """One SSE frame: `id`, `event` and a single `data` line of JSON.

    json.dumps escapes CR and LF inside strings, so the payload is always one line; non-ASCII
    stays as UTF-8 (U+2028 is harmless: SSE splits only on CR/LF).
    """
    if "\r" in event or "\n" in event:
        raise ValueError("SSE event names cannot contain line breaks")
    payload = _encode(data)
    return f"id: {event_id}\nevent: {event}\ndata: {payload}\n\n".encode()


def encode_comment(text: str = "ping") -> bytes:
    """A comment frame such as `: ping\\n\\n` (heartbeat); ignored by every SSE client."""
    lines = re.split(r"\r\n|\r|\n", text)
    return "".join(f": {line}\n" for line in lines).encode() + b"\n"
