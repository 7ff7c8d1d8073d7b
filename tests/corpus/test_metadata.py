"""Document metadata and filters (no Ray): what is valid, what is rejected and why, and what a filter selects."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ray_vdr.corpus.metadata import FilterError, MetadataError, PositionFields, parse_filter, read_sidecar


def test_sidecars_are_validated_and_bad_ones_say_why():
    ok = read_sidecar(b'{"collection": "finance", "year": 2021, "published": "2021-03-01", "draft": false}', "a.json")
    assert ok == {"collection": "finance", "year": 2021, "published": "2021-03-01", "draft": False}
    for data, reason, says in [
        (b'{"collection": "finance",', "invalid_metadata_json", "a.json"),
        (b'["a"]', "bad_metadata", "JSON object"),
        (b'{"tenant": 5}', "bad_metadata_type", "'tenant' must be a string"),
        (b'{"tags": ["a", "b"]}', "bad_metadata_type", "'tags'"),
        (b'{"when": "2021-13-45"}', "bad_metadata_type", "not a valid date"),
        (b'{"doc_id": "x"}', "bad_metadata", "set by the index"),
        (b'{"bad key": 1}', "bad_metadata", "field name"),
    ]:
        with pytest.raises(MetadataError, match=says) as e:
            read_sidecar(data, "a.json")
        assert e.value.reason == reason


def _fields():
    metas = [{"collection": "finance", "year": 2020, "published": "2020-05-01"},
             {"collection": "legal", "year": 2021, "published": "2021-05-01T10:00:00Z"},
             {"collection": "finance", "year": 2022},
             {}]
    return PositionFields([f"d{i}" for i in range(4)], [f"/s/{i}.pdf" for i in range(4)],
                          [json.dumps(m) if m else None for m in metas])


@pytest.mark.parametrize("flt,expected", [
    ({"collection": "finance"}, [0, 2]),
    ({"collection": {"in": ["legal", "hr"]}}, [1]),
    ({"year": {"gte": 2021}}, [1, 2]),
    ({"year": {"gt": 2020, "lt": 2022}}, [1]),
    ({"collection": "finance", "year": {"lte": 2021}}, [0]),
    ({"published": {"gte": "2021-01-01"}}, [1]),
    ({"doc_id": {"in": ["d3", "d0"]}}, [0, 3]),
])
def test_filters_select_the_matching_positions(flt, expected):
    assert np.flatnonzero(_fields().mask(parse_filter(flt))).tolist() == expected


@pytest.mark.parametrize("flt,says", [
    ({"customer": "acme"}, "'customer' is not a field of this index"),
    ({"year": "2021"}, "'year' is a number"),
    ({"collection": 3}, "'collection' is a string"),
    ({"collection": {"gte": "a"}}, "needs a number or a date field"),
    ({"published": {"gte": "yesterday"}}, "'published' is a date"),
    ({"year": {"near": 2020}}, "unknown operator 'near'"),
    ({"year": {"in": []}}, "non-empty list"),
])
def test_bad_filters_name_the_field(flt, says):
    with pytest.raises(FilterError, match=says):
        _fields().mask(parse_filter(flt))


def test_filter_limits():
    with pytest.raises(FilterError, match="limit is 2"):
        parse_filter({"a": 1, "b": 2, "c": 3}, max_clauses=2)
    with pytest.raises(FilterError, match="limit is 3"):
        parse_filter({"a": {"in": [1, 2, 3, 4]}}, max_values=3)
