"""The teacher pass end to end on tiny real models: cached arrays against a direct
recomputation from the teacher's logits, masking, resume, locking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from atkd_cache.cache import CacheWriter, open_cache
from atkd_cache.errors import UserError
from atkd_cache.split import hard_labels_np
from conftest import dump


def direct_logprobs(model_path, input_ids):
    """Full-vocabulary float64 log-probs of the teacher for one sequence run alone."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(input_ids, dtype=torch.long)[None]).logits[0]
    return torch.log_softmax(logits.double(), -1)[:-1]  # position t predicts t + 1


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_cached_arrays_match_direct_recomputation(assets, tmp_path, model):
    dump(assets, tmp_path / "c", model=model, top_k=8, logprob_dtype="float32", batch_size=5)
    cache = open_cache(tmp_path / "c")
    assert len(cache) == 24 and len(cache.shard_rows) > 1
    seen_outside = seen_inside = 0
    for seq in list(cache)[:6]:
        logp = direct_logprobs(assets[model], seq.input_ids)
        pos = np.nonzero(seq.supervised)[0]
        lp = logp[pos]
        top = lp.topk(8, -1)
        np.testing.assert_allclose(seq.topk_logprobs, top.values.numpy(), atol=2e-5)
        # ids: equal as sets up to ties in value
        for row, ref_ids, vals in zip(seq.topk_ids, top.indices.numpy(), top.values, strict=True):
            if len(set(vals.tolist())) == 8:
                assert set(row.tolist()) == set(ref_ids.tolist())
        tgt_ids = torch.as_tensor(seq.target_ids.astype(np.int64))
        tgt = lp.gather(1, tgt_ids[:, None]).squeeze(1)
        np.testing.assert_allclose(seq.target_logprob, tgt.numpy(), atol=2e-5)
        np.testing.assert_allclose(seq.uncertainty, 1 - tgt.exp().numpy(), atol=2e-5)
        ent = -(lp.exp() * lp).sum(-1)
        np.testing.assert_allclose(seq.entropy, ent.numpy(), atol=2e-5)
        assert np.array_equal(seq.hard, hard_labels_np(-tgt.numpy(), 0.5))
        exact_unc = -np.expm1(tgt.numpy())  # same rule on exact UNC, where it has no ties
        if len(np.unique(exact_unc)) == len(exact_unc):
            assert np.array_equal(seq.hard, hard_labels_np(exact_unc, 0.5))
        inside = (seq.topk_ids == seq.target_ids[:, None]).any(1)
        seen_inside += int(inside.sum())
        seen_outside += int((~inside).sum())
    assert seen_inside > 0 and seen_outside > 0  # both cases of the target were exercised


def test_k_equal_v_reproduces_full_distribution(assets, tmp_path):
    v = assets["vocab"]
    dump(assets, tmp_path / "c", top_k=v, logprob_dtype="float32", limit=3)
    seq = open_cache(tmp_path / "c")[1]
    logp = direct_logprobs(assets["llama"], seq.input_ids)[np.nonzero(seq.supervised)[0]]
    rebuilt = np.full(logp.shape, np.nan)
    np.put_along_axis(rebuilt, seq.topk_ids.astype(np.int64), seq.topk_logprobs, axis=1)
    np.testing.assert_allclose(rebuilt, logp.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.exp(rebuilt).sum(1), 1.0, atol=1e-4)


def test_batching_does_not_change_results(assets, tmp_path):
    dump(assets, tmp_path / "a", batch_size=1, logprob_dtype="float32")
    dump(assets, tmp_path / "b", batch_size=None, batch_tokens=300, logprob_dtype="float32")
    a, b = open_cache(tmp_path / "a"), open_cache(tmp_path / "b")
    for x, y in zip(a, b, strict=True):
        assert x.seq_id == y.seq_id
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(x.target_logprob, y.target_logprob, atol=1e-4)


def test_prompt_response_masks_only_response_and_eos(assets, tmp_path):
    import json

    dump(assets, tmp_path / "c", shape="prompt_response", template="Q: {prompt}\nA: ")
    tok = AutoTokenizer.from_pretrained(assets["llama"])
    rows = [json.loads(line) for line in open(assets["prompt_response"])]
    cache = open_cache(tmp_path / "c")
    for seq in cache:
        row = rows[seq.seq_id]
        assert tok.decode(seq.target_ids) == row["response"] + tok.eos_token
        prompt_ids = tok("Q: " + row["prompt"] + "\nA: ")["input_ids"]
        assert seq.input_ids[: len(prompt_ids)].tolist() == prompt_ids
        # the first supervised position is the last prompt token
        assert np.argmax(seq.supervised) == len(prompt_ids) - 1


def test_chat_masks_only_assistant_turns(assets, tmp_path):
    import json

    dump(assets, tmp_path / "c", shape="chat")
    tok = AutoTokenizer.from_pretrained(assets["llama"])
    rows = [json.loads(line) for line in open(assets["chat"])]
    for seq in open_cache(tmp_path / "c"):
        msgs = rows[seq.seq_id]["messages"]
        expected = "".join(m["content"] + "<|im_end|>\n" for m in msgs if m["role"] == "assistant")
        assert tok.decode(seq.target_ids) == expected
        assert tok.decode(seq.input_ids).startswith("<|im_start|>user\n" + msgs[0]["content"])


def test_truncation_is_counted_and_applied(assets, tmp_path):
    s = dump(assets, tmp_path / "c", max_length=12)
    cache = open_cache(tmp_path / "c")
    assert s.truncated > 0
    assert max(len(q.input_ids) for q in cache) == 12
    assert cache.num_tokens == s.tokens


def test_rerun_is_a_noop_and_other_config_is_refused(assets, tmp_path):
    dump(assets, tmp_path / "c")
    before = (tmp_path / "c" / "manifest.parquet").read_bytes()
    s = dump(assets, tmp_path / "c")
    assert s.new_sequences == 0 and s.sequences == 24
    assert (tmp_path / "c" / "manifest.parquet").read_bytes() == before
    with pytest.raises(UserError, match="top_k is 8 in the cache but 4 now"):
        dump(assets, tmp_path / "c", top_k=4)
    with pytest.raises(UserError, match="hard_ratio"):
        dump(assets, tmp_path / "c", hard_ratio=0.3)


def test_another_ranks_write_probe_is_no_strangers_file(assets, tmp_path):
    dump(assets, tmp_path / "c", limit=2)
    card = open_cache(tmp_path / "c").card
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / ".write-probe.4242").touch()  # rank 1 checking it may write here
    with CacheWriter(tmp_path / "new", card, rank=0, world_size=2) as writer:
        assert writer.card.identity == card.identity
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").touch()
    with pytest.raises(UserError, match="exists and is not an atkd-cache cache"):
        CacheWriter(tmp_path / "other", card).open()


def test_second_writer_is_refused(assets, tmp_path):
    dump(assets, tmp_path / "c", limit=2)
    card = open_cache(tmp_path / "c").card
    with CacheWriter(tmp_path / "c", card):
        with pytest.raises(UserError, match="is being written by pid"):
            dump(assets, tmp_path / "c", limit=2)


def test_reader_random_access_equals_iteration_and_url(assets, tmp_path):
    dump(assets, tmp_path / "c")
    cache = open_cache(tmp_path / "c")
    seqs = list(cache)
    assert [s.index for s in seqs] == list(range(24))
    assert [s.seq_id for s in seqs] == list(range(24))
    for i in (23, 0, 11, -1):
        np.testing.assert_array_equal(cache[i].topk_ids, seqs[i].topk_ids)
    by_url = open_cache("file://" + str(tmp_path / "c"))
    np.testing.assert_array_equal(by_url[5].input_ids, seqs[5].input_ids)
    sizes = [len(b) for b in cache.batches(5)]
    assert sizes == [5, 5, 5, 5, 4]
    with pytest.raises(IndexError):
        cache[24]
