"""What every benchmark does last: its result as one JSON line on stdout (and in --out)."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | None) -> None:
    """Print `result` as the last stdout line; also write it, indented, to `out` if given."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
