"""`dump-teacher --token-ids`: token ids scored exactly as given (never re-tokenized). A cache
of exported replies equals the generated cache they came from (teacher-forced re-scoring);
a cache of a text dataset's own ids equals the text cache, fingerprint included; each bad
input is one line and writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from atkd_cache import tiny
from atkd_cache.cache import open_cache
from atkd_cache.cache.inspect import verify_cache
from atkd_cache.cli.main import main
from conftest import dump


def ids_dump(model, data, out, *extra):
    return CliRunner().invoke(main, [
        "dump-teacher", "--model", model, "--data", str(data), "--token-ids", "-o", str(out),
        "--top-k", "8", "--dtype", "fp32", "--logprob-dtype", "float32", "--no-progress",
        "--shard-positions", "200", *extra])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_same_arrays(a, b, atol):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.seq_id == y.seq_id
        assert np.array_equal(x.input_ids, y.input_ids)
        assert np.array_equal(x.supervised, y.supervised)
        np.testing.assert_allclose(x.target_logprob, y.target_logprob, atol=atol)
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=atol)
        tied = np.isclose(x.topk_logprobs, y.topk_logprobs[:, -1:], atol=atol)
        assert ((x.topk_ids == y.topk_ids) | tied).all()
        assert np.array_equal(x.hard, y.hard)


def test_input_ids_of_a_dataset_give_its_cache_and_its_fingerprint(assets, tmp_path):
    """input_ids + a per-token supervised mask taken from a prompt/response cache: the same
    sequences, the same arrays and the same data fingerprint as that cache."""
    text = tmp_path / "text"
    dump(assets, text, shape="prompt_response", logprob_dtype="float32")
    cache = open_cache(text)
    rows = [{"input_ids": s.input_ids.tolist(), "supervised": [False, *s.supervised.tolist()]}
            for s in cache]
    r = ids_dump(assets["llama"], write_jsonl(tmp_path / "ids.jsonl", rows), tmp_path / "ids")
    assert r.exit_code == 0, r.output
    ids = open_cache(tmp_path / "ids")
    # (seq_id is the row: the text cache dropped no row here)
    assert [s.seq_id for s in cache] == list(range(len(cache)))
    assert_same_arrays(ids, cache, atol=1e-6)
    assert ids.card.data_fingerprint == cache.card.data_fingerprint
    assert ids.card.data_shape == "ids"
    assert ids.card.data_fields == {"input_ids": "input_ids", "supervised": "supervised"}
    assert verify_cache(ids) == []
    # without a mask every token after the first is a target
    bare = [{"input_ids": s.input_ids.tolist()} for s in cache][:3]
    r = ids_dump(assets["llama"], write_jsonl(tmp_path / "bare.jsonl", bare), tmp_path / "bare")
    assert r.exit_code == 0, r.output
    assert all(s.supervised.all() for s in open_cache(tmp_path / "bare"))


def test_exported_replies_rescored_equal_the_generated_cache(assets, tmp_path):
    """export --format responses of a --generate cache, scored back by the same teacher:
    the arrays captured while generating, within the re-scoring tolerance."""
    gen = tmp_path / "gen"
    dump(assets, gen, shape="chat", generate=True, num_responses=2, max_new_tokens=10,
         gen_temperature=0.8, logprob_dtype="float32", shard_positions=60)
    out = tmp_path / "replies.jsonl"
    r = CliRunner().invoke(main, ["export", str(gen), "--format", "responses", "-o", str(out),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["tokenizer_fingerprint"] == open_cache(gen).card.tokenizer_fingerprint
    r = ids_dump(assets["llama"], out, tmp_path / "rescored")
    assert r.exit_code == 0, r.output
    rescored, generated = open_cache(tmp_path / "rescored"), open_cache(gen)
    assert rescored.card.data_fields == {"prompt_ids": "prompt_ids",
                                         "completion_ids": "completion_ids"}
    # the rows are the replies in cache order: seq_id there is the row index here
    assert [s.seq_id for s in rescored] == list(range(len(generated)))
    for x, y in zip(rescored, generated, strict=True):
        assert np.array_equal(x.input_ids, y.input_ids)
        assert np.array_equal(x.supervised, y.supervised)
        np.testing.assert_allclose(x.target_logprob, y.target_logprob, atol=1e-4)
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-4)


@pytest.mark.parametrize("case", ["out-of-range", "negative", "empty-completion",
                                  "other-tokenizer", "first-supervised", "too-long",
                                  "no-ids-fields", "with-generate"])
def test_bad_token_ids_are_one_line_and_write_nothing(assets, tmp_path, case):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(assets["llama"]))
    good = {"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 2]}
    rows, extra, message = {
        "out-of-range": ([good, {"prompt_ids": [5], "completion_ids": [vocab + 3]}], (),
                         f"holds token id {vocab + 3}, outside the tokenizer's {vocab} ids"),
        "negative": ([{"prompt_ids": [5, -1], "completion_ids": [8]}], (),
                     "holds token id -1"),
        "empty-completion": ([good, {"prompt_ids": [5, 6], "completion_ids": []}], (),
                             "row 1 (counting from 0) has an empty completion"),
        "other-tokenizer": ([{**good, "tokenizer_fingerprint": "sha256:" + "0" * 64}], (),
                            "was written with another tokenizer"),
        "first-supervised": ([{"input_ids": [5, 6, 7], "supervised": [True, True, True]}], (),
                             "marks its first token supervised"),
        "too-long": ([{"input_ids": list(range(3, 40))}], ("--max-length", "16"),
                     "has 37 token ids, over --max-length 16"),
        "no-ids-fields": ([{"text": "hello"}], (), "has neither prompt_ids + completion_ids"),
        "with-generate": ([good], ("--generate",), "--token-ids scores given replies"),
    }[case]
    r = ids_dump(assets["llama"], write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "c",
                 *extra)
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and message in errors[0], r.output
    assert "Traceback" not in r.output and not (tmp_path / "c" / "zarr.json").exists()


def test_ids_need_the_teacher_vocabulary(assets, tmp_path):
    """Ids within the given tokenizer but outside the teacher's logits (a tokenizer that is
    not the teacher's) are refused before any shard is written."""
    small = str(tmp_path / "small")
    tiny.build_tokenizer(small)
    tiny.build_model(small, 40)  # a teacher with 40 logits behind the same tokenizer
    rows = [{"prompt_ids": [5, 6], "completion_ids": [50, 2]}]
    r = ids_dump(small, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "c")
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "outside the teacher's 40" in errors[0]
    assert not (tmp_path / "c" / "zarr.json").exists()
