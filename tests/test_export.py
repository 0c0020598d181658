"""`atkd-cache export --format axolotl` on a real cache, read back through `datasets` and padded
by axolotl's own `DataCollatorForKD` (0.19, loaded from its wheel by scripts/setup); its own
top-k forward-KL loss on those tensors equals a dense reference computed from the cache with
our alignment (row t = the teacher's distribution of token t + 1)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from atkd_cache.cache.reader import open_cache
from conftest import dump

AXOLOTL = os.path.join(os.path.dirname(sys.executable), "..", "axolotl-0.19.0", "axolotl")


def axolotl_module(relative: str, name: str):
    """Load one axolotl source file as `name` (parent packages stubbed: importing axolotl's
    package __init__ pulls in its whole training stack)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    spec = importlib.util.spec_from_file_location(name, os.path.join(AXOLOTL, relative))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    dump(assets, root / "cache", shape="chat", top_k=8, shard_positions=400)
    out = subprocess.run(
        [sys.executable, "-m", "atkd_cache.cli.main", "export", "--format", "axolotl",
         str(root / "cache"), "-o", str(root / "axolotl"), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return {"cache": str(root / "cache"), "out": str(root / "axolotl"), "stdout": out.stdout}


def test_layout_and_card(exported):
    import datasets

    cache = open_cache(exported["cache"])
    ds = datasets.load_dataset(exported["out"], split="train")
    assert len(ds) == len(cache)
    assert len(glob.glob(os.path.join(exported["out"], "data", "*.parquet"))) == \
        len(cache.shard_rows)
    for seq, row in zip(cache, ds, strict=True):
        n = len(seq.input_ids)
        assert row["input_ids"] == seq.input_ids.tolist()
        mask = np.array(row["target_mask"])
        assert mask.shape == (n, 8)
        sup = np.flatnonzero(seq.supervised)
        assert np.flatnonzero(mask[:, 0]).tolist() == sup.tolist()
        assert np.flatnonzero(np.array(row["labels"]) != -100).tolist() == (sup + 1).tolist()
        ids = np.array(row["target_token_ids"])[sup]
        assert np.array_equal(ids, seq.topk_ids)
        probs = np.exp(np.array(row["target_logprobs"])[sup])
        assert np.allclose(probs.sum(1), 1.0, atol=1e-5)  # renormalised over the top-k
    readme = open(os.path.join(exported["out"], "README.md")).read()
    assert cache.card.teacher_weights_hash in readme and "kd_temperature: 1.0" in readme
    summary = json.load(open(os.path.join(exported["out"], "atkd_export.json")))
    assert summary["supervised_positions"] == sum(r["num_supervised"] for r in cache.shard_rows)


def test_axolotl_collator_and_loss_match_a_dense_reference(exported, assets):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    axolotl_module("utils/collators/batching.py", "axolotl.utils.collators.batching")
    collator_mod = axolotl_module("integrations/kd/collator.py", "axolotl.integrations.kd.collator")
    kl = axolotl_module("integrations/kd/topk_logprob/forward_kl.py",
                        "axolotl.integrations.kd.topk_logprob.forward_kl")
    tokenizer = AutoTokenizer.from_pretrained(assets["llama"])
    collate = collator_mod.DataCollatorForKD(tokenizer=tokenizer, padding="longest")
    rows = datasets.load_dataset(exported["out"], split="train").select(range(5))
    batch = collate([dict(r) for r in rows])
    assert batch["target_logprobs"].shape[:2] == batch["input_ids"].shape

    model = AutoModelForCausalLM.from_pretrained(assets["gpt2"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        theirs = kl.loss(logits, batch["target_token_ids"], batch["target_logprobs"],
                         batch["target_mask"])
        # dense reference from the cache: sum_k p_T(k) (log p_T(k) - log q(k)) over the
        # renormalised top-k of each supervised position t, scored with the logits at t,
        # averaged over supervised positions x k (axolotl's normalisation without
        # num_items_in_batch)
        cache = open_cache(exported["cache"])
        total, count = 0.0, 0
        for b in range(5):
            seq = cache[b]
            lq = torch.log_softmax(logits[b], dim=-1)
            for j, t in enumerate(np.flatnonzero(seq.supervised)):
                lp = torch.from_numpy(seq.topk_logprobs[j]).double()
                lp = lp - torch.logsumexp(lp, 0)
                q = lq[t, torch.from_numpy(seq.topk_ids[j]).long()].double()
                total += float((lp.exp() * (lp - q)).sum())
                count += lp.numel()
    assert float(theirs) == pytest.approx(total / count, rel=1e-4)


def test_align_current_is_shifted_by_one(exported, tmp_path):
    import datasets

    from atkd_cache.hf import export_axolotl

    export_axolotl(exported["cache"], str(tmp_path / "cur"), align="current", progress=False)
    a = datasets.load_dataset(exported["out"], split="train")[0]
    b = datasets.load_dataset(str(tmp_path / "cur"), split="train")[0]
    assert b["target_token_ids"][1:] == a["target_token_ids"][:-1]
    assert b["target_mask"][1:] == a["target_mask"][:-1] and not any(b["target_mask"][0])
    assert b["labels"] == a["labels"]


def test_every_cache_has_a_dataset_card(exported, tmp_path):
    """README.md (a Hub dataset card) in a dumped cache and in a concat of two."""
    from atkd_cache.cache.concat import concat_caches

    cache = open_cache(exported["cache"])
    for folder, opened in ((exported["cache"], cache),
                           (str(tmp_path / "joined"), None)):
        if opened is None:
            opened = concat_caches([exported["cache"], exported["cache"]], folder)
        text = open(os.path.join(folder, "README.md")).read()
        front = text.split("---")[1]
        assert "knowledge-distillation" in front and "viewer: false" in front
        rows = opened.shard_rows
        for fact in (opened.card.teacher_weights_hash, opened.card.tokenizer_fingerprint,
                     opened.card.identity, "top-8 ids + log-probs",
                     f"| sequences | `{sum(r['num_sequences'] for r in rows)}` |",
                     f"| supervised positions | `{sum(r['num_supervised'] for r in rows)}` |",
                     "atkd-cache train-student --cache .", "KDTrainer("):
            assert fact in text, fact
