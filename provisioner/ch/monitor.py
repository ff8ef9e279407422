"""Cloud Hypervisor's `--event-monitor` stream: pretty-printed JSON objects separated by blank lines.

It is not JSON Lines (each object spans many lines), so `EventStream` decodes whole objects with
`raw_decode` from whatever arrived so far and keeps the rest for the next chunk:

    {
      "timestamp": {"secs": 0, "nanos": 29228},
      "source": "vm",
      "event": "booting",
      "properties": null
    }

The timestamp counts from the VMM's start. There is no guest-ready event: readiness comes from the guest.
"""

from __future__ import annotations

import json
from collections import namedtuple

TYPE_CHECKING = False  # the stand-in imports this module: typing would cost each VMM start 10 ms of CPU
if TYPE_CHECKING:
    from typing import Any


class VmmEvent(namedtuple("VmmEvent", "secs source event properties", defaults=(None,))):
    """secs: since the VMM started. A namedtuple, not a dataclass or pydantic: the stand-in imports this module,
    and hundreds of them start at once in a benchmark (dataclasses alone imports inspect and ast)."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return f"{self.source}/{self.event}"


class EventStream:
    def __init__(self) -> None:
        self._buffer = ""
        self._decoder = json.JSONDecoder()

    def feed(self, text: str) -> list[VmmEvent]:
        self._buffer += text
        events = []
        while True:
            start = len(self._buffer) - len(self._buffer.lstrip())
            if start == len(self._buffer):
                self._buffer = ""
                return events
            try:
                obj, end = self._decoder.raw_decode(self._buffer, start)
            except json.JSONDecodeError:
                self._buffer = self._buffer[start:]
                return events  # an object cut in the middle: wait for the rest
            self._buffer = self._buffer[end:]
            stamp = obj.get("timestamp") or {}
            events.append(VmmEvent(secs=stamp.get("secs", 0) + stamp.get("nanos", 0) / 1e9,
                                   source=obj.get("source", ""), event=obj.get("event", ""),
                                   properties=obj.get("properties")))


def format_event(secs: float, source: str, event: str, properties: dict[str, Any] | None = None) -> str:
    """One event exactly as CH writes it (serde_json's pretty printer, then a blank line)."""
    whole = int(secs)
    body = {"timestamp": {"secs": whole, "nanos": int((secs - whole) * 1e9)}, "source": source,
            "event": event, "properties": properties}
    return json.dumps(body, indent=2) + "\n\n"
