"""Versioned JSON outputs: one stamp, one reader, and the sensitivity table's schema.

Every JSON document hqjax writes is a mapping that starts with::

    {"schema": "hqjax.<kind>", "schema_version": 1,
     "versions": {"hqjax": "...", "jax": "...", "flax": "..."}, ...}

so a file says what it is and which code wrote it. Readers go through :func:`unstamp`,
which checks the version and migrates older files: a file without ``schema_version``
(written before versioning, version 0) is read as version 1 (for the sensitivity table
see :func:`sensitivity_rows`); a file from a newer hqjax is refused with a clear message.
Errors are :class:`SchemaError`, both a ``ValueError`` (for the API) and a
``UserError`` (exit code 2 in the commands).

The sensitivity table (``sensitivity.json`` of ``hqjax run``, ``SensitivityTable.to_json``,
``python -m hqjax.alloc --table``) has one schema, kind ``sensitivity``::

    {..stamp.., <job settings: model, dataset, seed, ...>,
     "layers": [{"layer": "conv1", "n_params": 320, "perturbation": {"4": 0.1, ...},
                 "trace": 1.2, "trace_stderr": 0.1, "top_eigenvalues": [3.4], ...}, ...]}

Row fields are those of ``hqjax.LayerSensitivity`` (its ``eigenvalues`` are stored as
``top_eigenvalues``); other row fields (``index``, ``avg_trace``, ...) are kept by the
writer and ignored by the table reader.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable, Mapping

from hqjax._errors import UserError

__all__ = ["SCHEMA_VERSION", "SchemaError", "versions", "stamp", "unstamp", "read_json", "sensitivity_document",
           "sensitivity_rows"]

SCHEMA_VERSION = 1
STAMP_KEYS = ("schema", "schema_version", "versions")


class SchemaError(UserError, ValueError):
    """A JSON file that cannot be read: corrupt, of another kind, or of an unknown schema version."""


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """``{"hqjax": ..., "jax": ..., "flax": ...}``: installed versions (``'unknown'`` if not found)."""
    from importlib import metadata

    out = {}
    for dist in ("hqjax", "jax", "flax"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def stamp(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` with the schema stamp in front (an existing stamp is replaced)."""
    rest = {k: v for k, v in body.items() if k not in STAMP_KEYS}
    return {"schema": f"hqjax.{kind}", "schema_version": SCHEMA_VERSION, "versions": versions(), **rest}


def unstamp(doc: Any, kind: str | None = None, source: str = "the JSON document") -> Any:
    """Check ``doc``'s stamp and return it without the stamp keys (non-mappings pass through).

    Raises
    ------
    SchemaError : ``doc`` is of another kind than ``kind`` or of a schema version this
        hqjax does not know.
    """
    if not isinstance(doc, Mapping):
        return doc
    version = doc.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise SchemaError(f"{source}: schema_version {version!r} is not a version number; "
                          f"rewrite the file with this hqjax (schema_version {SCHEMA_VERSION})")
    if version > SCHEMA_VERSION:
        raise SchemaError(f"{source} has schema_version {version}, newer than this hqjax reads "
                          f"({SCHEMA_VERSION}); upgrade hqjax (pip install -U hqjax) or rewrite the file")
    found = doc.get("schema")
    if kind is not None and found is not None and found != f"hqjax.{kind}":
        raise SchemaError(f"{source} holds a {found!r} document, not 'hqjax.{kind}'; pass the right file")
    return {k: v for k, v in doc.items() if k not in STAMP_KEYS}


def read_json(path: str | os.PathLike, kind: str | None = None) -> Any:
    """Parse the JSON file at ``path`` and :func:`unstamp` it; every failure names the file."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise SchemaError(f"file {path!r} does not exist; check the path") from None
    except IsADirectoryError:
        raise SchemaError(f"{path!r} is a folder, not a JSON file") from None
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                          f"fix or regenerate the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SchemaError(f"cannot read {path!r}: {e}") from None
    return unstamp(doc, kind, repr(path))


# ----------------------------------------------------------------------------- sensitivity
def sensitivity_document(rows: Iterable[Mapping[str, Any]], **settings: Any) -> dict[str, Any]:
    """The versioned sensitivity document of layer ``rows`` (each with ``layer`` and
    ``n_params``) and the job ``settings`` that produced them (model, dataset, seed, ...)."""
    rows = [dict(r) for r in rows]
    for r in rows:
        if "layer" not in r or "n_params" not in r:
            raise ValueError(f"a sensitivity row needs 'layer' and 'n_params'; got keys {sorted(r)}")
    return stamp("sensitivity", {**settings, "layers": rows})


def sensitivity_rows(doc: Any, source: str = "the sensitivity table") -> list[dict[str, Any]]:
    """The layer rows of a sensitivity document, migrating schema version 0.

    Version 0 had two layouts, both accepted: ``hqjax run``'s ``{"layers": [rows]}`` and
    ``SensitivityTable.to_dict``'s ``{layer: {"n_params": ..., "eigenvalues": [...]}}``.
    """
    if not isinstance(doc, Mapping):
        raise SchemaError(f"{source} must hold a JSON object with a 'layers' list, got {type(doc).__name__}")
    body = unstamp(doc, "sensitivity", source)
    if "layers" in body and isinstance(body["layers"], list):
        rows = body["layers"]
    elif "schema_version" not in doc and all(isinstance(v, Mapping) and "n_params" in v for v in body.values()):
        rows = [{"layer": name, **{("top_eigenvalues" if k == "eigenvalues" else k): v for k, v in row.items()}}
                for name, row in body.items()]  # version 0, SensitivityTable.to_dict
    else:
        raise SchemaError(f"{source} has no 'layers' list; write it with SensitivityTable.to_json or hqjax analyze")
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping) or "layer" not in r or "n_params" not in r:
            raise SchemaError(f"{source}: layer row {i} needs 'layer' and 'n_params' fields")
    return [dict(r) for r in rows]
