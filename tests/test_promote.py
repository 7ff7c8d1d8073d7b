"""Promotion's decision rule (no Ray); promotion on a running endpoint under load is in tests/serving/test_app.py."""

from __future__ import annotations

from ray_vdr.promote import decide


def test_decide_promotes_only_when_not_worse():
    assert decide(0.50, 0.50)[0] and decide(0.50, 0.51)[0] and not decide(0.50, 0.4999)[0]
    assert not decide(0.50, 0.52, min_delta=0.05)[0] and decide(0.50, 0.40, min_delta=-0.2)[0]
    assert decide(0.5, 0.4)[1] == "candidate NDCG@10 0.4000 < live 0.5000"
