"""The served-teacher client's pure parts (the behaviour against real vLLM servers is in
tests/test_vllm.py): base URLs, Retry-After, the probe's answer, and the card's tolerance for
two servers' probes (resume and concat compare them)."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest

from atkd_cache.cache.schema import PROBE_TOLERANCE, probe_gap, probes_agree
from atkd_cache.teacher.server import base_url, probe_logprobs, retry_after


def test_a_v1_base_url_is_the_same_server():
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"):
        assert base_url(url) == "http://h:8000"
    assert base_url("http://h:8000/v10") == "http://h:8000/v10"  # not the API prefix


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "-2"}) == 0.0
    assert retry_after({}) is None and retry_after({"retry-after": "soon"}) is None
    later = retry_after({"retry-after": formatdate(time.time() + 30, usegmt=True)})
    assert 27 < later <= 31


def test_probe_answer_and_its_shape():
    probe = [5, 6, 7]
    body = {"choices": [{"prompt_logprobs": [None, {"6": {"logprob": -1.5, "rank": 2}},
                                             {"7": {"logprob": -0.25, "rank": 1}}]}]}
    assert probe_logprobs(body, probe) == [-1.5, -0.25]
    short = {"choices": [{"prompt_logprobs": [None, {"6": {"logprob": -1.5, "rank": 2}}]}]}
    with pytest.raises(ValueError, match="2 prompt log-prob entries for a 3-token probe"):
        probe_logprobs(short, probe)
    other = {"choices": [{"prompt_logprobs": [None, {"9": {"logprob": -1.0, "rank": 1}},
                                              {"7": {"logprob": -0.25, "rank": 1}}]}]}
    with pytest.raises(KeyError):
        probe_logprobs(other, probe)


def test_probes_agree_within_the_tolerance_only():
    a = [-1.0, -2.0, -0.5]
    assert probes_agree(a, [x + PROBE_TOLERANCE / 2 for x in a])
    assert not probes_agree(a, [-1.0, -2.0 + 2 * PROBE_TOLERANCE, -0.5])
    assert not probes_agree(a, a[:2])
    assert "up to 0.01 nats apart" in probe_gap(a, [-1.0, -2.01, -0.5])
    assert probe_gap(a, a[:2]) == "3 vs 2 probe positions"


def test_a_card_compares_probes_within_the_tolerance(assets, tmp_path):
    """Resume and concat compare cards with first_difference: a probe within the tolerance
    is the same teacher, one beyond it is named; a card without a probe keeps the
    fingerprint it always had (no teacher_probe key in its attributes)."""
    import dataclasses

    from atkd_cache.cache import open_cache
    from conftest import dump

    dump(assets, tmp_path / "c", limit=4)
    card = open_cache(tmp_path / "c").card
    assert "teacher_probe" not in card.to_attrs()
    assert card.content_fingerprint() == card.fingerprint
    served = dataclasses.replace(card, teacher_probe=[-1.0, -2.0])
    near = dataclasses.replace(card, teacher_probe=[-1.0, -2.0 + PROBE_TOLERANCE / 2])
    far = dataclasses.replace(card, teacher_probe=[-1.0, -2.3])
    assert served.first_difference(near) is None
    assert served.first_difference(far)[0] == "teacher_probe"
    assert served.first_difference(card)[0] == "teacher_probe"
    assert served.content_fingerprint() != card.content_fingerprint()
