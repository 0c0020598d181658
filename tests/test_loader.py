"""The streaming loader: coverage, disjointness across ranks/workers, batch budgets, exact
replay and elastic resume, and batch contents against the cache read sequence by sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atkd_cache.cache import open_cache
from atkd_cache.train.loader import (
    CacheDataset,
    Cursor,
    LoaderConfig,
    assign_shards,
    cut_batches,
    loader_settings,
    make_loader,
    plan_sizes,
)
from conftest import dump


@pytest.fixture(scope="module")
def chat_cache(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "cache"
    dump(assets, out, shape="chat", shard_positions=60)
    return str(out)


def batches(path, cfg, rank=0, world=1, epoch=0, resume=None):
    ds = CacheDataset(path, cfg, rank, world, resume=resume)
    ds.set_epoch(epoch)
    return list(make_loader(ds)), ds


def test_every_sequence_once_disjoint_whole_shards(chat_cache):
    cache = open_cache(chat_cache)
    assert len(cache.shard_rows) >= 6
    shard_of = {}
    for s, row in enumerate(cache.shard_rows):
        for i in range(row["first_sequence"], row["first_sequence"] + row["num_sequences"]):
            shard_of[i] = s
    for world, workers in [(1, 0), (1, 2), (2, 1), (3, 2)]:
        cfg = LoaderConfig(batch_tokens=300, num_workers=workers, shuffle_buffer=8, group_size=4)
        seen_by_slot: dict[int, list[int]] = {}
        for rank in range(world):
            got, ds = batches(chat_cache, cfg, rank, world)
            assert plan_sizes(ds)[rank] == len(got)
            for b in got:
                seen_by_slot.setdefault(int(b["slot"]), []).extend(b["seq_index"].tolist())
        everything = [i for v in seen_by_slot.values() for i in v]
        assert sorted(everything) == list(range(len(cache)))  # once each, no overlap
        # each shard is read by exactly one slot
        owners: dict[int, set] = {}
        for slot, seqs in seen_by_slot.items():
            for i in seqs:
                owners.setdefault(shard_of[i], set()).add(slot)
        assert all(len(o) == 1 for o in owners.values())


def test_batch_budget_and_padding(chat_cache):
    for pack in (False, True):
        got, _ = batches(chat_cache, LoaderConfig(batch_tokens=400, pack=pack, num_workers=0))
        for b in got:
            real = int(b["real_tokens"])
            if len(b["seq_index"]) > 1:
                assert b["input_ids"].numel() <= 400
            if pack:
                assert b["input_ids"].shape[0] == 1 and b["input_ids"].numel() == real
            else:
                assert int(b["attention_mask"].sum()) == real


def test_cut_batches_sorts_and_splits():
    refs = [(0, i, n) for i, n in enumerate([5, 3, 9, 4, 20])]
    padded = cut_batches(refs, 12, pack=False)
    assert [[r[2] for r in b] for b in padded] == [[3, 4], [5], [9], [20]]  # 3 x 5 > 12
    packed = cut_batches(refs, 12, pack=True)
    assert [[r[2] for r in b] for b in packed] == [[3, 4, 5], [9], [20]]
    assert [[r[2] for r in b] for b in cut_batches(refs, 13, pack=True)] == [[3, 4, 5], [9], [20]]
    assert [[r[2] for r in b] for b in cut_batches(refs, 18, pack=False)] == [[3, 4, 5], [9], [20]]


def test_assign_shards_balances():
    owned = assign_shards([10, 10, 10, 10, 1], slots=2, seed=0, epoch=0)
    loads = [sum([10, 10, 10, 10, 1][s] for s in o) for o in owned]
    assert sorted(loads) == [20, 21]
    assert sorted(sum(owned, [])) == [0, 1, 2, 3, 4]


def test_batch_contents_match_cache(chat_cache):
    cache = open_cache(chat_cache)
    for pack in (False, True):
        got, _ = batches(chat_cache, LoaderConfig(batch_tokens=500, pack=pack, num_workers=1))
        for b in got:
            offsets = b["group_offsets"].tolist()
            flat_ids = b["input_ids"].flatten()
            for j, index in enumerate(b["seq_index"].tolist()):
                seq = cache[index]
                lo, hi = offsets[j], offsets[j + 1]
                rows = b["rows"][lo:hi]
                # the token at each row + 1 is the supervised target
                target = torch.from_numpy(seq.target_ids.astype(np.int64))
                assert torch.equal(flat_ids[rows + 1], target)
                assert torch.equal(b["target_ids"][lo:hi], flat_ids[rows + 1])
                assert np.array_equal(b["topk_ids"][lo:hi].numpy(), seq.topk_ids)
                assert np.array_equal(b["topk_logprobs"][lo:hi].numpy(), seq.topk_logprobs)
                assert np.array_equal(b["target_logprob"][lo:hi].numpy(), seq.target_logprob)
                assert np.array_equal(b["hard"][lo:hi].numpy(), seq.hard)
            if pack:
                pos = b["position_ids"][0]
                starts = (pos == 0).nonzero().flatten().tolist()
                assert len(starts) == len(b["seq_index"])


def test_epochs_reshuffle_and_seed_repeats(chat_cache):
    cfg = LoaderConfig(batch_tokens=300, num_workers=0)
    order = lambda e, seed=0: [  # noqa: E731
        i for b in batches(chat_cache, LoaderConfig(**{**cfg.__dict__, "seed": seed}), epoch=e)[0]
        for i in b["seq_index"].tolist()
    ]
    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0) != order(0, seed=1)
    assert sorted(order(1)) == sorted(order(0))


@pytest.mark.parametrize("workers", [1, 2])
def test_replay_resume_is_exact(chat_cache, workers):
    cfg = LoaderConfig(batch_tokens=300, num_workers=workers, shuffle_buffer=8, group_size=4)
    full, _ = batches(chat_cache, cfg)
    cut = len(full) // 2 + 1  # an odd count for 2 workers: tests the worker rotation
    taken = full[:cut]
    counts = [0] * workers
    for b in taken:
        counts[int(b["slot"])] += 1
    cursor = Cursor(epoch=0, world_size=1, num_workers=workers, slot_batches=counts,
                    settings=loader_settings(cfg))
    rest, _ = batches(chat_cache, cfg, resume=cursor)
    assert [b["seq_index"].tolist() for b in rest] == [b["seq_index"].tolist() for b in full[cut:]]


def test_elastic_resume_covers_the_rest_once(chat_cache):
    cfg = LoaderConfig(batch_tokens=300, num_workers=1, shuffle_buffer=8, group_size=4)
    n = len(open_cache(chat_cache))
    first = [batches(chat_cache, cfg, rank=r, world=2)[0] for r in range(2)]
    used = np.zeros(n, bool)
    for got in first:
        for b in got[:3]:
            used[b["seq_index"].numpy()] = True
    cursor = Cursor(epoch=0, world_size=2, num_workers=1, slot_batches=[3, 3],
                    settings=loader_settings(cfg), consumed=used)
    rest, ds = batches(chat_cache, cfg, world=1, resume=cursor)
    assert ds.resume_mode() == "filter"
    after = [i for b in rest for i in b["seq_index"].tolist()]
    assert sorted(after + np.flatnonzero(used).tolist()) == list(range(n))
    # the next epoch ignores the cursor and covers everything again
    nxt, _ = batches(chat_cache, cfg, world=1, epoch=1, resume=cursor)
    assert sorted(i for b in nxt for i in b["seq_index"].tolist()) == list(range(n))


def test_reads_a_cache_by_fsspec_url(chat_cache):
    cfg = LoaderConfig(batch_tokens=300, num_workers=1)
    local, _ = batches(chat_cache, cfg)
    remote, _ = batches("file://" + chat_cache, cfg)
    assert [b["seq_index"].tolist() for b in remote] == [b["seq_index"].tolist() for b in local]
    assert all(torch.equal(a["topk_ids"], b["topk_ids"]) for a, b in zip(local, remote,
                                                                         strict=True))
