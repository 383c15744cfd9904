"""Real shop exports in by mapping alone: mapping v2 (several files, joins, rules, groups, value maps).

A silo whose ``mapping.json`` (or ``mapping.toml``) says ``"version": 2`` holds the shop's own
export files; the mapping says how they become the canonical events and users tables, which then
go through the usual validation and quarantine of ``fedretain.ingest``. See ``spec`` for the
format and ``examples/`` for tested mappings (order-line export, marketplace export, CDNOW).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from fedretain.exports.spec import MappingError, MappingV2, is_v2, parse_spec

__all__ = ["MappingError", "MappingV2", "example_mapping", "export_silo", "is_v2", "parse_spec", "read_mapping_file"]

MAPPING_FILES = ("mapping.json", "mapping.toml")
EXAMPLES = ("orderlines", "marketplace", "cdnow")


def read_mapping_file(path: str | Path) -> Any:
    """Decode a mapping file (JSON, or TOML by suffix); ``MappingError`` naming the file and position."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MappingError(f"{path}: mapping file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingError(f"{path}: cannot read mapping file: {exc}") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib  # Python 3.11+
        except ImportError:
            raise MappingError(f"{path}: TOML mappings need Python 3.11 or later; use mapping.json") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise MappingError(f"{path}: invalid TOML: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MappingError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def example_mapping(name: str) -> dict:
    """One of the shipped example mappings (``orderlines``, ``marketplace``, ``cdnow``), decoded."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example mapping {name!r}; choose one of {', '.join(EXAMPLES)}")
    return json.loads((resources.files("fedretain.exports") / "examples" / f"{name}.json").read_text("utf-8"))


def export_silo(folder: Path, merchant: dict, mapping: Any, *, now=None, quarantine_dir=None, chunksize=100_000):
    """The silo read through a v2 mapping, or None when the mapping is not v2 (then v1 applies).

    ``mapping`` is what ``load_silo`` was given: None (use the silo's mapping file), a path, a dict
    or a v1 ``ColumnMapping``.
    """
    from fedretain.exports.runner import load_export_silo

    where = "mapping"
    if mapping is None:
        found = [folder / n for n in MAPPING_FILES if (folder / n).is_file()]
        if len(found) > 1:
            raise MappingError(f"{folder}: both mapping.json and mapping.toml exist; keep exactly one")
        if not found:
            return None
        mapping = found[0]
    if isinstance(mapping, (str, Path)):
        where = str(mapping)
        data = read_mapping_file(mapping)
    elif isinstance(mapping, dict):
        data = mapping
    else:
        return None
    if isinstance(data, dict) and data.get("version", 1) not in (1, 2):
        raise MappingError(f"{where}: 'version' must be 1 or 2, got {data.get('version')!r}")
    if not is_v2(data):
        return None
    spec = parse_spec(data, where)
    return load_export_silo(folder, spec, merchant, now=now, quarantine_dir=quarantine_dir, chunksize=chunksize)
