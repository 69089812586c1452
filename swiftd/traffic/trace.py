"""The trace file: what requests arrive when. JSONL, one request per line, in arrival order.

    {"at_s": 0.731, "deadline_s": 60.0, "request": {<swiftd.v1.GenerateRequest in proto3 JSON>}}

- `at_s`: seconds after the start of the replay at which the request is sent (non-decreasing).
- `deadline_s`: the gRPC deadline the load generator gives the call, counted from `at_s`.
- `request`: the public API's GenerateRequest as protobuf's JSON mapping writes it
  (`google.protobuf.json_format`: camelCase field names, enum names, bytes as base64), so a
  request captured from an operator's own traffic replays unchanged. A conditioning image is
  PNG or JPEG bytes, base64-encoded, as in the API.

Lines starting with `#` and blank lines are ignored (a generator writes its settings there).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format

from swiftd.v1 import gateway_pb2


@dataclass(frozen=True)
class TraceEntry:
    at_s: float
    request: gateway_pb2.GenerateRequest
    deadline_s: float = 120.0

    def to_json(self) -> str:
        request = json_format.MessageToDict(self.request, preserving_proto_field_name=False)
        return json.dumps({"at_s": round(self.at_s, 6), "deadline_s": self.deadline_s, "request": request})

    @classmethod
    def from_json(cls, line: str, where: str = "trace") -> TraceEntry:
        try:
            obj = json.loads(line)
            request = json_format.ParseDict(obj["request"], gateway_pb2.GenerateRequest())
            return cls(at_s=float(obj["at_s"]), request=request, deadline_s=float(obj.get("deadline_s", 120.0)))
        except (ValueError, KeyError, TypeError, json_format.ParseError) as exc:
            raise ValueError(f"{where}: not a trace entry ({exc.__class__.__name__}: {exc})") from None


def write_trace(path: str | Path, entries: Iterable[TraceEntry], header: dict | None = None) -> None:
    lines = [f"# {json.dumps(header, sort_keys=True)}"] if header else []
    lines += [entry.to_json() for entry in entries]
    Path(path).write_text("\n".join(lines) + "\n")


def read_trace(path: str | Path) -> list[TraceEntry]:
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            entries.append(TraceEntry.from_json(line, where=f"{path}:{number}"))
    for before, after in zip(entries, entries[1:]):
        if after.at_s < before.at_s:
            raise ValueError(f"{path}: at_s must not decrease ({after.request.request_id} at {after.at_s})")
    return entries


def read_header(path: str | Path) -> dict:
    """The generator's settings, from the first `# {...}` line (empty for a hand-made trace)."""
    with open(path) as fh:
        first = fh.readline()
    if first.startswith("# "):
        try:
            return json.loads(first[2:])
        except ValueError:
            return {}
    return {}
