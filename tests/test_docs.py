"""docs/cache-format.md's plain zarr + pyarrow reading example runs against a real cache and
agrees with the library reader."""

import re
from pathlib import Path

import numpy as np
import pytest

from atkd_cache.cache import open_cache
from conftest import dump

DOC = Path(__file__).resolve().parents[1] / "docs" / "cache-format.md"


def blocks() -> list[str]:
    """The python blocks of the reading section: common, top-k, sampled, checking."""
    section = DOC.read_text().split("## Reading a cache", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, re.S)[:4]


def run_example(cache, mode: str, check: bool = True) -> dict:
    """Run the doc's common reading block, the block of this mode, and the checking block."""
    common, topk, sampled, checking = blocks()
    scope = {"CACHE": str(cache)}
    code = common + (topk if mode == "topk" else sampled) + (checking if check else "")
    exec(compile(code, str(DOC), "exec"), scope)
    return scope


def test_doc_reader_refuses_a_missing_chunk_and_a_changed_card(assets, tmp_path):
    dump(assets, tmp_path / "c", limit=4)
    common, _, _, checking = blocks()
    (tmp_path / "c" / "shards" / "shard-000000" / "topk_logprobs" / "c" / "0" / "0").unlink()
    with pytest.raises(ValueError, match="shard-000000/topk_logprobs: a chunk is missing"):
        exec(compile(common, str(DOC), "exec"), {"CACHE": str(tmp_path / "c")})
    dump(assets, tmp_path / "d", limit=4)
    card = tmp_path / "d" / "zarr.json"
    card.write_text(card.read_text().replace('"data_split": "train"', '"data_split": "tr4in"'))
    with pytest.raises(AssertionError, match="card damaged"):
        exec(compile(common + checking, str(DOC), "exec"), {"CACHE": str(tmp_path / "d")})


def test_third_party_reading_example(assets, tmp_path):
    dump(assets, tmp_path / "c", shape="prompt_response")
    scope = run_example(tmp_path / "c", "topk")
    first = open_cache(tmp_path / "c")[0]
    np.testing.assert_array_equal(scope["input_ids"], first.input_ids)
    np.testing.assert_array_equal(scope["targets"], first.target_ids)
    np.testing.assert_array_equal(scope["topk_ids"], first.topk_ids)
    assert (scope["tail"] > -1e-3).all() and (scope["tail"] < 1).all()


def test_third_party_reading_example_generated(assets, tmp_path):
    """A generated cache (two replies per prompt): the doc's checks recompute its prompts'
    data fingerprint and its card fingerprint, generation settings included."""
    dump(assets, tmp_path / "g", shape="chat", generate=True, num_responses=2,
         max_new_tokens=6, limit=6)
    scope = run_example(tmp_path / "g", "topk")
    assert scope["responses"] == 2
    first = open_cache(tmp_path / "g")[0]
    np.testing.assert_array_equal(scope["input_ids"], first.input_ids)


def test_third_party_reading_example_sampled_packed(assets, tmp_path):
    dump(assets, tmp_path / "s", shape="prompt_response", mode="sampled", num_samples=20,
         encoding="packed")
    scope = run_example(tmp_path / "s", "sampled")
    first = open_cache(tmp_path / "s")[0]
    np.testing.assert_array_equal(scope["target_logprob"], first.target_logprob)  # bitround
    assert len(scope["ids"]) == len(first.target_ids)
    np.testing.assert_array_equal(np.concatenate(scope["ids"]), first.sample_ids)
    assert all(abs(w.sum() - 1) < 1e-12 for w in scope["weights"])


def test_third_party_text_example(assets, tmp_path):
    """The doc's text block: the bytes and supervised byte spans of a chat cache's last read
    sequence, from the stored tokenizer with plain transformers, equal the library's."""
    from transformers import AutoTokenizer

    from atkd_cache.cache.text import load_text

    dump(assets, tmp_path / "c", shape="chat", limit=4)
    common, topk = blocks()[:2]
    text_block = re.findall(r"```python\n(.*?)```", DOC.read_text().split(
        "### The text", 1)[1], re.S)[0]
    scope = {"CACHE": str(tmp_path / "c")}
    exec(compile(common + topk + text_block, str(DOC), "exec"), scope)
    cache = open_cache(tmp_path / "c")
    seq = next(s for s in cache if s.input_ids.tolist() == scope["tokens"].tolist())
    assert scope["raw"] == load_text(cache).sequence_bytes(seq.input_ids)
    teacher = AutoTokenizer.from_pretrained(assets["llama"])
    assert scope["raw"].decode() == teacher.decode(seq.input_ids)
    spans = scope["supervised_spans"]
    reply = b"".join(scope["raw"][lo:hi] for lo, hi in spans).decode()
    assert spans and reply.endswith("<|im_end|>\n") and "<|im_start|>assistant" not in reply


INTEGRATIONS = DOC.parent / "integrations.md"


def test_integrations_page_runs(hf_cache, tmp_path):
    """Every python block of docs/integrations.md, in order, on a real cache and student; the
    torchrun script under torchrun with 2 processes; the export command."""
    import os
    import subprocess
    import sys

    text = INTEGRATIONS.read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)
    script = [c for c in code if 'os.environ.get("CACHE"' in c]
    assert len(code) == 6 and len(script) == 1
    from transformers import AutoTokenizer

    from atkd_cache import tiny

    other = str(tmp_path / "other-student")  # a student with another tokenizer
    tiny.build_tokenizer(other, vocab_size=420, seed=5)
    tiny.build_model(other, len(AutoTokenizer.from_pretrained(other)), seed=2)
    scope = {"CACHE": hf_cache["cache"], "STUDENT": hf_cache["student"], "OUT": str(tmp_path),
             "OTHER_STUDENT": other}
    for block in code:
        if block not in script:
            exec(compile(block, str(INTEGRATIONS), "exec"), scope)
    assert scope["trainer"].state.global_step == 2  # the TRL block ran last
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CACHE": hf_cache["cache"],
           "STUDENT": hf_cache["student"], "OUT": str(tmp_path)}
    (tmp_path / "train_kd.py").write_text(script[0])
    launch = re.search(r"^(torchrun .*?) +#", text, re.M).group(1).split()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *launch[1:3],
                           "--master_port", "29563", str(tmp_path / "train_kd.py")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train_runtime" in done.stdout + done.stderr

    export = re.search(r"^atkd-cache export .*$", text, re.M).group(0).split()
    export = [hf_cache["cache"] if a == "CACHE" else a for a in export[1:]]
    export[-1] = str(tmp_path / "axolotl-kd")
    done = subprocess.run([sys.executable, "-m", "atkd_cache.cli.main", *export,
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "kd_temperature: 1.0" in done.stdout, done.stderr


def test_python_reading_example_and_its_field_table(assets, tmp_path):
    """The 'with atkd-cache' block runs, and its table names every field a sequence has."""
    dump(assets, tmp_path / "c", shape="prompt_response")
    section = DOC.read_text().split("## Reading a cache with atkd-cache", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    scope = {"CACHE": str(tmp_path / "c")}
    exec(compile(code, str(DOC), "exec"), scope)
    seq = scope["seq"]
    assert seq.index == 0 and len(seq.target_ids) == len(seq.target_logprob)
    table = section.split("## Versioning")[0]
    fields = [f for f in vars(seq) if getattr(seq, f) is not None] + ["target_ids"]
    for name in fields:
        assert f"`{name}`" in table, name
