"""docs/cache-format.md's plain zarr + pyarrow reading example runs against a real cache and
agrees with the library reader."""

import re
from pathlib import Path

import numpy as np

from atkd_cache.cache import open_cache
from conftest import dump

DOC = Path(__file__).resolve().parents[1] / "docs" / "cache-format.md"


def run_example(cache, mode: str) -> dict:
    """Run the doc's common reading block, then the block of this mode, on a cache."""
    section = DOC.read_text().split("## Reading a cache", 1)[1]
    common, topk, sampled = re.findall(r"```python\n(.*?)```", section, re.S)[:3]
    scope = {"CACHE": str(cache)}
    exec(compile(common + (topk if mode == "topk" else sampled), str(DOC), "exec"), scope)
    return scope


def test_third_party_reading_example(assets, tmp_path):
    dump(assets, tmp_path / "c", shape="prompt_response")
    scope = run_example(tmp_path / "c", "topk")
    first = open_cache(tmp_path / "c")[0]
    np.testing.assert_array_equal(scope["input_ids"], first.input_ids)
    np.testing.assert_array_equal(scope["targets"], first.target_ids)
    np.testing.assert_array_equal(scope["topk_ids"], first.topk_ids)
    assert (scope["tail"] > -1e-3).all() and (scope["tail"] < 1).all()


def test_third_party_reading_example_sampled_packed(assets, tmp_path):
    dump(assets, tmp_path / "s", shape="prompt_response", mode="sampled", num_samples=20,
         encoding="packed")
    scope = run_example(tmp_path / "s", "sampled")
    first = open_cache(tmp_path / "s")[0]
    np.testing.assert_array_equal(scope["target_logprob"], first.target_logprob)  # bitround
    assert len(scope["ids"]) == len(first.target_ids)
    np.testing.assert_array_equal(np.concatenate(scope["ids"]), first.sample_ids)
    assert all(abs(w.sum() - 1) < 1e-12 for w in scope["weights"])
