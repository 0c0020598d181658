"""docs/cache-format.md's plain zarr + pyarrow reading example runs against a real cache and
agrees with the library reader."""

import re
from pathlib import Path

import numpy as np

from atkd_cache.cache import open_cache
from conftest import dump

DOC = Path(__file__).resolve().parents[1] / "docs" / "cache-format.md"


def test_third_party_reading_example(assets, tmp_path):
    dump(assets, tmp_path / "c", shape="prompt_response")
    code = re.search(r"## Reading a cache.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    scope = {"CACHE": str(tmp_path / "c")}
    exec(compile(code, str(DOC), "exec"), scope)
    first = open_cache(tmp_path / "c")[0]
    np.testing.assert_array_equal(scope["input_ids"], first.input_ids)
    np.testing.assert_array_equal(scope["targets"], first.target_ids)
    np.testing.assert_array_equal(scope["topk_ids"], first.topk_ids)
    assert (scope["tail"] > -1e-3).all() and (scope["tail"] < 1).all()
