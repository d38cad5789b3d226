"""JSON text for the allocation results: one writer and one reader for every result type."""

from __future__ import annotations

import json
from typing import Any


def dump_json(data: Any, path: str | None = None) -> str:
    """``data`` as indented JSON text, also written to ``path`` when given."""
    text = json.dumps(data, indent=1)
    if path is not None:
        with open(path, "w") as f:
            f.write(text)
    return text


def load_json(text_or_path: str) -> Any:
    """Parse JSON text, or the file at ``text_or_path`` when it is not an object literal."""
    text = text_or_path
    if not text_or_path.lstrip().startswith("{"):
        with open(text_or_path) as f:
            text = f.read()
    return json.loads(text)
