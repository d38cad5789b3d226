"""JSON text for the allocation results: one writer and one reader for every result type.

Documents are stamped with their schema (``hqjax._schema``) when written with a ``kind``;
the reader checks the stamp, and a corrupt or missing file is a ``SchemaError`` (a
``ValueError``) that names the file.
"""

from __future__ import annotations

import json
from typing import Any

from hqjax._schema import SchemaError, read_json, stamp, unstamp

__all__ = ["dump_json", "load_json"]


def dump_json(data: Any, path: str | None = None, kind: str | None = None) -> str:
    """``data`` as indented JSON text (stamped as ``hqjax.<kind>`` when ``kind`` is given),
    also written to ``path`` when given."""
    if kind is not None:
        data = stamp(kind, data)
    text = json.dumps(data, indent=1)
    if path is not None:
        with open(path, "w") as f:
            f.write(text)
    return text


def load_json(text_or_path: str, kind: str | None = None) -> Any:
    """Parse JSON text, or the file at ``text_or_path`` when it is not an object literal,
    and check its schema stamp (``kind``: the document kind expected, if any)."""
    if not text_or_path.lstrip().startswith("{"):
        return read_json(text_or_path, kind)
    try:
        doc = json.loads(text_or_path)
    except json.JSONDecodeError as e:
        raise SchemaError(f"the JSON text is not valid ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return unstamp(doc, kind)
