"""Document metadata and filters over it: validating a document's metadata, reading sidecars and metadata tables,
and turning a search filter into a mask over an index's vector positions (pure functions, no Ray).

A document's metadata comes from (later wins): the config's metadata table (``index.metadata``, Parquet or JSONL with
a ``source`` or ``doc_id`` column), then a sidecar ``<file>.json`` next to the source. Reserved fields are
``collection``, ``tenant``, ``title``, ``url`` and ``lang`` (strings); free attributes are strings, numbers,
booleans or dates (``YYYY-MM-DD``, optionally with a time). Anything else (a list, an object, a reserved field that is
not a string, invalid JSON) is a :class:`MetadataError`, and the document is rejected with it: never indexed with
wrong or missing metadata.

A filter (``POST /search``'s ``filter``, ``ray-vdr delete --filter``) is an object of clauses, all of which must
hold::

    {"collection": "finance", "tenant": {"in": ["a", "b"]}, "year": {"gte": 2020, "lt": 2023},
     "published": {"gte": "2021-01-01"}}

``doc_id`` and ``source`` are always filterable. A field the index does not have, an operator other than ``eq``,
``in``, ``gt``, ``gte``, ``lt``, ``lte``, or a value of the wrong type is a :class:`FilterError` naming the field.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["BUILTIN_FIELDS", "RESERVED", "FilterError", "MetadataError", "PositionFields", "field_type",
           "parse_filter", "read_metadata_table", "read_sidecar", "validate_metadata"]

RESERVED = ("collection", "tenant", "title", "url", "lang")
BUILTIN_FIELDS = ("doc_id", "source")  # every page has them, whatever its metadata
MAX_FIELDS = 64
MAX_KEY_CHARS = 64
MAX_STRING_CHARS = 2_000
MAX_SIDECAR_BYTES = 1 << 20
KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?$")
OPS = ("eq", "in", "gt", "gte", "lt", "lte")


class MetadataError(ValueError):
    """A document's metadata that cannot be indexed; ``reason`` is the reject reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class FilterError(ValueError):
    """A filter the index cannot apply (the endpoint answers 422 with this message, which names the field)."""


def _date(value: str) -> np.datetime64:
    text = value.replace(" ", "T")
    if text.endswith("Z") or re.search(r"[+-]\d{2}:?\d{2}$", text):  # to UTC, then naive (numpy has no zones)
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        return np.datetime64(parsed.astimezone(dt.UTC).replace(tzinfo=None), "s")
    return np.datetime64(text, "s")


def field_type(value: Any) -> str:
    """string | number | bool | date for a valid metadata value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "date" if DATE.match(value) else "string"


def validate_metadata(meta: Any, where: str) -> dict[str, Any]:
    """``meta`` checked and normalised (dates from a Parquet/JSON date become ISO strings); MetadataError otherwise."""
    if not isinstance(meta, dict):
        raise MetadataError("bad_metadata", f"{where}: metadata must be a JSON object, got {type(meta).__name__}")
    if len(meta) > MAX_FIELDS:
        raise MetadataError("bad_metadata", f"{where}: {len(meta)} fields; the limit is {MAX_FIELDS}")
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if not isinstance(key, str) or not KEY.match(key) or len(key) > MAX_KEY_CHARS:
            raise MetadataError("bad_metadata", f"{where}: field name {key!r} must match {KEY.pattern} "
                                f"(at most {MAX_KEY_CHARS} characters)")
        if key in BUILTIN_FIELDS:
            raise MetadataError("bad_metadata", f"{where}: {key!r} is set by the index, not by metadata")
        if value is None:
            continue
        if isinstance(value, dt.datetime | dt.date):
            value = value.isoformat()
        if key in RESERVED and not isinstance(value, str):
            raise MetadataError("bad_metadata_type", f"{where}: reserved field {key!r} must be a string, got "
                                f"{type(value).__name__} {value!r}"[:300])
        if isinstance(value, float) and not math.isfinite(value):
            raise MetadataError("bad_metadata_type", f"{where}: field {key!r} is {value}, not a finite number")
        if not isinstance(value, str | int | float | bool):
            raise MetadataError("bad_metadata_type", f"{where}: field {key!r} must be a string, number, boolean or "
                                f"date, got {type(value).__name__}")
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                raise MetadataError("bad_metadata", f"{where}: field {key!r} has {len(value)} characters; the limit "
                                    f"is {MAX_STRING_CHARS}")
            if DATE.match(value):
                try:
                    _date(value)
                except ValueError as e:
                    raise MetadataError("bad_metadata_type", f"{where}: field {key!r}: {value!r} is not a valid "
                                        f"date ({e})") from None
        out[key] = value
    return out


def read_sidecar(data: bytes, where: str) -> dict[str, Any]:
    """A sidecar ``<file>.json``'s metadata (validated); MetadataError for invalid JSON or values."""
    if len(data) > MAX_SIDECAR_BYTES:
        raise MetadataError("bad_metadata", f"{where}: {len(data)} bytes; the limit is {MAX_SIDECAR_BYTES}")
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetadataError("invalid_metadata_json", f"{where}: {e}") from None
    return validate_metadata(meta, where)


def read_metadata_table(uri: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """A metadata table (Parquet, or JSONL with one object per line): (key column, {key: raw metadata}). It is keyed
    by ``source`` (a source's URI or path) or ``doc_id``; values are validated per document, later."""
    from ray_vdr.storage import read_bytes, read_table

    if uri.endswith((".jsonl", ".json")):
        rows = []
        for n, line in enumerate(read_bytes(uri).decode("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"index.metadata {uri}: line {n} is not JSON: {e}") from None
    else:
        rows = read_table(uri).to_pylist()
    key = "source" if rows and "source" in rows[0] else "doc_id"
    if rows and any(not isinstance(r, dict) or not isinstance(r.get(key), str) for r in rows):
        raise ValueError(f"index.metadata {uri}: every row needs a string 'source' or 'doc_id' column")
    return key, {r[key]: {k: v for k, v in r.items() if k != key} for r in rows}


# ---------------------------------------------------------------------------------------------------------------------
# filters


def parse_filter(raw: Any, max_clauses: int = 16, max_values: int = 1_000) -> list[tuple[str, str, Any]]:
    """A filter object as (field, op, value) clauses, checked for shape (not yet against an index's fields)."""
    if not isinstance(raw, dict):
        raise FilterError("filter must be an object of field: value or field: {op: value} clauses")
    clauses = []
    for name, cond in raw.items():
        ops = cond if isinstance(cond, dict) else {"eq": cond}
        if not ops:
            raise FilterError(f"filter field {name!r}: give a value or an operator ({', '.join(OPS)})")
        for op, value in ops.items():
            if op not in OPS:
                raise FilterError(f"filter field {name!r}: unknown operator {op!r} (use {', '.join(OPS)})")
            values = value if op == "in" else [value]
            if op == "in" and (not isinstance(value, list) or not value):
                raise FilterError(f"filter field {name!r}: 'in' takes a non-empty list")
            if len(values) > max_values:
                raise FilterError(f"filter field {name!r}: {len(values)} values; the limit is {max_values}")
            if any(not isinstance(v, str | int | float | bool) or v is None for v in values):
                raise FilterError(f"filter field {name!r}: values must be strings, numbers, booleans or dates")
            if op in ("gt", "gte", "lt", "lte") and (isinstance(value, bool) or
                                                     not isinstance(value, int | float | str)):
                raise FilterError(f"filter field {name!r}: {op} takes a number or a date")
            clauses.append((name, op, value))
    if len(clauses) > max_clauses:
        raise FilterError(f"filter has {len(clauses)} clauses; the limit is {max_clauses}")
    return clauses


class PositionFields:
    """Metadata of every vector position of an index, column by column, for filters: per field a type and a compact
    column: numbers and dates as float64 / datetime64 arrays (NaN / NaT where a page lacks the field); strings and
    booleans, doc_id and source dictionary-encoded (:class:`_Coded`: a code per position in the narrowest integer
    type, -1 where a page lacks the field, and the distinct values once). Built from Arrow columns without a Python
    object per position: each distinct metadata JSON is parsed once (a document's pages share theirs)."""

    def __init__(self, doc_ids, sources, metadata):
        doc_ids, sources, metadata = (_arrow(c) for c in (doc_ids, sources, metadata))
        self.n = len(doc_ids)
        self.types: dict[str, str] = {"doc_id": "string", "source": "string"}
        self.columns: dict[str, np.ndarray | _Coded] = {"doc_id": _Coded.of(doc_ids), "source": _Coded.of(sources)}
        codes, dictionary = _encoded(metadata)
        distinct = [json.loads(m) if m else {} for m in dictionary.to_pylist()]
        at = np.where(codes < 0, len(distinct), codes)  # no metadata: past the distinct values, at an empty slot
        values: dict[str, list] = {}
        for i, parsed in enumerate(distinct):
            for k, v in parsed.items():
                if k not in values:
                    values[k] = [None] * (len(distinct) + 1)
                    self.types[k] = field_type(v)
                values[k][i] = v
        for k, col in values.items():
            t = self.types[k]
            if t == "number":
                per = np.array([v if isinstance(v, int | float) and not isinstance(v, bool) else np.nan for v in col],
                               dtype=np.float64)
            elif t == "date":
                per = np.array([_date(v) if isinstance(v, str) and DATE.match(v) else np.datetime64("NaT")
                                for v in col], dtype="datetime64[s]")
            else:  # string or bool: compared by equality
                coded = _Coded.of_values(col)
                self.columns[k] = _Coded(coded.codes[at], coded.values)
                continue
            self.columns[k] = per[at]

    def mask(self, clauses: list[tuple[str, str, Any]]) -> np.ndarray:
        """Positions that satisfy every clause; FilterError naming the field for an unknown field or a wrong type."""
        out = np.ones(self.n, dtype=bool)
        for name, op, value in clauses:
            if name not in self.types:
                known = ", ".join(sorted(self.types))
                raise FilterError(f"filter field {name!r} is not a field of this index (fields: {known})")
            t, col = self.types[name], self.columns[name]
            vals = [self._value(name, t, v) for v in (value if op == "in" else [value])]
            if op in ("gt", "gte", "lt", "lte") and t not in ("number", "date"):
                raise FilterError(f"filter field {name!r} is a {t}: {op} needs a number or a date field")
            if isinstance(col, _Coded):
                m = col.isin(vals)
            elif op in ("eq", "in"):
                m = np.isin(col, np.array(vals, dtype=col.dtype))
            else:
                m = {"gt": np.greater, "gte": np.greater_equal, "lt": np.less, "lte": np.less_equal}[op](col, vals[0])
            out &= np.asarray(m, dtype=bool)
        return out

    def scope_mask(self, scope: list[tuple[str, list[str]]]) -> np.ndarray:
        """Positions whose ``field`` is one of the values, for every (field, values) of an API key's scope; a field
        the index does not have matches nothing (a scoped key sees no unscoped page)."""
        out = np.ones(self.n, dtype=bool)
        for name, values in scope:
            col = self.columns.get(name)
            if col is None:
                return np.zeros(self.n, dtype=bool)
            if isinstance(col, _Coded):
                out &= col.isin(list(values))
            else:  # a number or date field: no string value equals one of its values
                out &= np.zeros(self.n, dtype=bool)
        return out

    def nbytes(self) -> int:
        """Bytes the columns hold (codes, numbers, dates; the distinct values of each coded column)."""
        return sum(c.nbytes() if isinstance(c, _Coded) else c.nbytes for c in self.columns.values())

    @staticmethod
    def _value(name: str, t: str, v: Any) -> Any:
        if t == "number":
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise FilterError(f"filter field {name!r} is a number, not {type(v).__name__} {v!r}")
            return float(v)
        if t == "date":
            if not isinstance(v, str) or not DATE.match(v):
                raise FilterError(f"filter field {name!r} is a date: give YYYY-MM-DD, not {v!r}")
            return _date(v)
        if t == "bool":
            if not isinstance(v, bool):
                raise FilterError(f"filter field {name!r} is a boolean, not {type(v).__name__} {v!r}")
            return v
        if not isinstance(v, str):
            raise FilterError(f"filter field {name!r} is a string, not {type(v).__name__} {v!r}")
        return v


def _arrow(column) -> pa.ChunkedArray:
    """A column as a chunked Arrow array (from an Arrow array, a chunked array, or a list), not copied."""
    if isinstance(column, pa.ChunkedArray):
        return column
    return pa.chunked_array([column if isinstance(column, pa.Array) else pa.array(list(column), pa.string())])


def _encoded(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(a code per position, -1 for null, in the narrowest integer type; the distinct values): dictionary-encoded
    chunk by chunk into one array (Arrow's encoding shares one dictionary across the chunks; no column copy)."""
    enc = pc.dictionary_encode(column)
    dictionary = enc.chunks[-1].dictionary if enc.num_chunks else pa.array([], column.type)
    codes = np.empty(len(column), _code_dtype(len(dictionary)))
    at = 0
    for chunk in enc.chunks:
        codes[at:at + len(chunk)] = pc.fill_null(chunk.indices, -1).to_numpy(zero_copy_only=False)
        at += len(chunk)
    return codes, dictionary


def _code_dtype(distinct: int) -> type:
    """The narrowest signed integer type holding codes of ``distinct`` values and -1 (missing)."""
    return next((t for t in (np.int8, np.int16, np.int32) if distinct < np.iinfo(t).max), np.int64)


class _Coded:
    """A dictionary-encoded column: a code per position (-1: no value) and the distinct values (an Arrow array for
    doc_id and source, a list for metadata fields, whose values may mix types)."""

    def __init__(self, codes: np.ndarray, values: pa.Array | list):
        self.codes, self.values = codes, values
        self._lookup = None if isinstance(values, pa.Array) else {(type(v), v): i for i, v in enumerate(values)}

    @classmethod
    def of(cls, strings: pa.ChunkedArray) -> _Coded:
        return cls(*_encoded(strings))

    @classmethod
    def of_values(cls, values: list) -> _Coded:
        """Codes of a list of Python values (None: no value)."""
        distinct: dict[tuple, int] = {}
        codes = np.array([-1 if v is None else distinct.setdefault((type(v), v), len(distinct)) for v in values],
                         np.int64)
        return cls(codes.astype(_code_dtype(len(distinct))), [v for _, v in distinct])

    def isin(self, wanted: list) -> np.ndarray:
        if self._lookup is None:
            at = pc.index_in(pa.array([w for w in wanted if isinstance(w, str)], pa.string()), self.values)
            found = [c for c in at.to_pylist() if c is not None]
        else:
            found = [self._lookup[(type(w), w)] for w in wanted if (type(w), w) in self._lookup]
        if not found:
            return np.zeros(len(self.codes), dtype=bool)
        return np.isin(self.codes, np.array(found, self.codes.dtype))

    def nbytes(self) -> int:
        held = self.values.nbytes if isinstance(self.values, pa.Array) else sum(len(str(v)) for v in self.values)
        return int(self.codes.nbytes + held)
