"""Students with another tokenizer (issue 32) end to end on real tiny models: the cache keeps
the teacher's tokenizer (its text), the loader's alignment step against a plain walk over
token bytes, the identical-tokenizer reductions through the loader, and `train-student
--cross-tokenizer` with its one-line refusals."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from atkd_cache import tiny
from atkd_cache.cache import open_cache
from atkd_cache.cache.text import load_text, token_bytes
from atkd_cache.errors import UserError
from atkd_cache.train.align import Aligner
from conftest import dump

TURNS = ["Café naïve résumé — 東京 and 北京 🙂🙂 ok", "12345 + 678 =   9, tabs\tand  runs",
         "plain words here", "emoji 👩\u200d💻 mid-word: naïveté", "über straße ½ №5"]


@pytest.fixture(scope="module")
def xt(assets, tmp_path_factory):
    """A chat cache and a text cache of the tiny Llama teacher; a student with another
    byte-level tokenizer (more merges, another seed) and its own random model."""
    root = tmp_path_factory.mktemp("xt")
    chats = root / "chats.jsonl"
    rows = []
    for i in range(24):
        a, b = TURNS[i % len(TURNS)], TURNS[(i * 3 + 1) % len(TURNS)]
        rows.append({"messages": [{"role": "user", "content": f"{a} {i}"},
                                  {"role": "assistant", "content": f"{b} ({i * 7})"}]})
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dump({**assets, "chat": str(chats)}, root / "chat-cache", shape="chat")
    dump(assets, root / "text-cache", shape="text")
    student = str(root / "student")
    tiny.build_tokenizer(student, vocab_size=420, seed=5)
    tiny.build_model(student, len(AutoTokenizer.from_pretrained(student)), seed=2)
    return {"chat": str(root / "chat-cache"), "text": str(root / "text-cache"),
            "student": student, "root": root}


def test_the_cache_keeps_its_tokenizer_and_its_text(xt, assets, tmp_path):
    import shutil

    import zarr

    cache = open_cache(xt["chat"])
    text = cache.card.text
    assert text["byte_level"] and set(text["files"]) >= {"tokenizer.json"}
    loaded = load_text(cache)
    teacher = AutoTokenizer.from_pretrained(assets["llama"])
    seq = cache[0]
    # the bytes are the rendered chat, byte for byte, special markers included
    rendered = teacher.apply_chat_template(json.loads(open(
        xt["root"] / "chats.jsonl").readline())["messages"], tokenize=False)
    assert loaded.sequence_bytes(seq.input_ids).decode("utf-8") == rendered
    assert loaded.table == token_bytes(teacher)

    # a damaged file, a cache written before the text was kept: one line each
    copy = tmp_path / "c"
    shutil.copytree(xt["chat"], copy)
    with open(copy / "tokenizer" / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(UserError, match="does not match its sha256"):
        load_text(open_cache(str(copy)))
    fingerprint = open_cache(str(copy)).card.identity
    group = zarr.open_group(str(copy), mode="r+")
    attrs = dict(group.attrs)
    del attrs["text"]
    group.attrs.clear()
    group.attrs.update(attrs)
    old = open_cache(str(copy), check=False)  # (the manifest's card digest is of the new card)
    assert old.card.identity == fingerprint  # the text is not part of what a cache holds
    assert old.card.content_fingerprint() == open_cache(xt["chat"]).card.content_fingerprint()
    with pytest.raises(UserError, match="written before atkd-cache stored the teacher's"):
        load_text(old)


def plain_walk(seq, t_table, s_tok, s_table):
    """The alignment from its definition, one token at a time in plain Python: the
    teacher's bytes, the student's tokens of that text, chunks closed where both sides end a
    token, and a chunk counted when every teacher token in it is a supervised target and its
    first student token has a context. Returns per counted chunk (teacher log-likelihood,
    the student's (row, target) pairs, bytes, teacher tokens)."""
    ids = [int(i) for i in seq.input_ids]
    sup = [bool(x) for x in seq.supervised]
    lp_at, k = {}, 0
    for pos, s in enumerate(sup):
        if s:
            lp_at[pos] = float(seq.target_logprob[k])
            k += 1
    text = b"".join(t_table[i] for i in ids).decode("utf-8")
    prefix = s_tok("", add_special_tokens=True)["input_ids"]
    sids = s_tok(text, add_special_tokens=False)["input_ids"]
    out, t, s, t_end, s_end = [], 0, 0, 0, 0
    while t < len(ids):
        t_lo, s_lo = t, s
        t_end += len(t_table[ids[t]])
        t += 1
        while True:  # advance whichever side is behind until both end at the same byte
            while s < len(sids) and s_end < t_end:
                s_end += len(s_table[sids[s]])
                s += 1
            if s_end == t_end:
                break
            t_end += len(t_table[ids[t]])
            t += 1
        counted = t_lo >= 1 and all(sup[j - 1] for j in range(t_lo, t)) and \
            s_lo + len(prefix) >= 1
        if counted:
            ll = sum(lp_at[j - 1] for j in range(t_lo, t))
            rows = [(len(prefix) + j - 1, sids[j]) for j in range(s_lo, s)]
            out.append((ll, rows, sum(len(t_table[ids[j]]) for j in range(t_lo, t)), t - t_lo))
    return out, prefix + sids


def test_alignment_equals_a_plain_walk_and_every_supervised_byte_is_in_one_chunk(xt):
    cache = open_cache(xt["chat"])
    text = load_text(cache)
    s_tok = AutoTokenizer.from_pretrained(xt["student"])
    aligner = Aligner(text.table, s_tok)
    multi = 0
    for seq in cache:
        got = aligner.align(seq)
        want, student_ids = plain_walk(seq, text.table, s_tok, token_bytes(s_tok))
        assert got.student_ids.tolist() == student_ids
        assert len(got.teacher_ll) == len(want)
        for c, (ll, rows, nbytes, n_teacher) in enumerate(want):
            assert got.teacher_ll[c] == pytest.approx(ll, abs=1e-9)
            mine = np.flatnonzero(got.chunk_of_row == c)
            assert [(int(got.rows[i]), int(got.target_ids[i])) for i in mine] == rows
            assert got.first_row[c] == mine[0] and got.chunk_bytes[c] == nbytes
            multi += len(rows) != n_teacher
        # every supervised teacher token's bytes lie in exactly one counted chunk, unless its
        # chunk also holds a token outside the supervised span (a span edge)
        sup = seq.supervised
        counted = sum(got.chunk_bytes)
        in_span = sum(len(text.table[int(seq.input_ids[j])]) for j in range(1, len(sup) + 1)
                      if sup[j - 1])
        assert counted <= in_span and counted > 0.8 * in_span
    assert multi > 0  # the two tokenizations really differ


def test_identical_tokenizers_reduce_to_the_single_tokenizer_losses(xt, assets):
    """Student tokenizer = teacher tokenizer: chunks are tokens, the aligned batch has the
    cache's own rows, and gold = KD over the bucketed top-k, alm = TKD + the teacher's binary
    entropy, uld = the sorted distance (all through the loader's collate)."""
    from atkd_cache.losses.crosstok import crosstok_loss, uld_terms
    from atkd_cache.losses.kd import LossConfig, kd_loss
    from atkd_cache.train.loader import collate, collate_aligned
    from atkd_cache.train.trainer import chunk_teacher, sparse_teacher

    cache = open_cache(xt["text"])
    text = load_text(cache)
    aligner = Aligner(text.table, AutoTokenizer.from_pretrained(assets["llama"]))
    seqs = [cache[i] for i in range(6)]
    aligned = [aligner.align(s) for s in seqs]
    for s, a in zip(seqs, aligned, strict=True):
        assert a.student_ids.tolist() == s.input_ids.tolist()
    plain = collate(seqs, pack=False)
    mine = collate_aligned(seqs, aligned, False, aligner.vocab_map)
    assert torch.equal(plain["rows"], mine["rows"])
    assert torch.equal(plain["target_ids"], mine["target_ids"])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(plain["rows"]), assets["vocab"], generator=g, dtype=torch.float64)
    cpu = torch.device("cpu")
    teacher, chunks = sparse_teacher(plain, cpu), chunk_teacher(mine, cpu)
    torch.testing.assert_close(chunks.teacher_ll, teacher.target_logprob.double())
    gold = crosstok_loss(logits, chunks, LossConfig(cross_tokenizer="gold", base="fkl"))
    kd = kd_loss(logits, teacher, LossConfig(loss="kd", base="fkl"))
    torch.testing.assert_close(gold.loss, kd.loss, rtol=1e-6, atol=1e-7)
    # alm: chunks are tokens, so it is the per-token binary CE between p_T(target) and
    # q(target) (= TKD + the teacher's binary entropy where the cached support is consistent:
    # tests/test_crosstok.py; the cache's float16 top-k rows need not sum below 1)
    alm = crosstok_loss(logits, chunks, LossConfig(cross_tokenizer="alm"))
    p = teacher.target_logprob.double().exp()
    q = torch.softmax(logits, -1).gather(1, teacher.target_ids[:, None])[:, 0]
    want = -(p * q.log() + (1 - p) * torch.log1p(-q))
    torch.testing.assert_close(alm.loss, want.mean(), rtol=1e-9, atol=1e-12)
    uld = crosstok_loss(logits, chunks, LossConfig(cross_tokenizer="uld"))
    want = uld_terms(torch.log_softmax(logits, -1), chunks.support_logprobs.double(),
                     chunks.support_valid).mean()
    torch.testing.assert_close(uld.loss, want)


def _chunk_loss(student: str, cache: str, mode: str) -> float:
    """The mode's loss over the whole cache (every sequence once, in order)."""
    from atkd_cache.losses.crosstok import crosstok_loss
    from atkd_cache.losses.kd import LossConfig
    from atkd_cache.models import load_causal_lm
    from atkd_cache.train.loader import collate_aligned
    from atkd_cache.train.student import RowLogits
    from atkd_cache.train.trainer import chunk_teacher

    opened = open_cache(cache)
    aligner = Aligner(load_text(opened).table, AutoTokenizer.from_pretrained(student))
    net = RowLogits(load_causal_lm(student, dtype="fp32", device="cpu").eval())
    total, n = 0.0, 0
    with torch.no_grad():
        for seqs in opened.batches(8):
            b = collate_aligned(seqs, [aligner.align(s) for s in seqs], False,
                                aligner.vocab_map)
            logits = net(b["input_ids"], b["rows"], attention_mask=b["attention_mask"])
            out = crosstok_loss(logits, chunk_teacher(b, torch.device("cpu")),
                                LossConfig(cross_tokenizer=mode))
            c = int(b["chunk.teacher_ll"].numel())
            total, n = total + float(out.loss) * c, n + c
    return total / n


@pytest.mark.parametrize("mode", ["alm", "uld", "gold"])
def test_train_student_with_another_tokenizer(xt, mode, tmp_path):
    """Each mode trains the other-tokenizer student: its loss over the cache falls, the
    saved student keeps its own tokenizer, and run.json records the mode."""
    from cli.main import main

    out = tmp_path / "run"
    before = _chunk_loss(xt["student"], xt["chat"], mode)
    r = CliRunner().invoke(main, [
        "train-student", "--cache", xt["chat"], "--student", xt["student"], "-o", str(out),
        "--cross-tokenizer", mode, "--epochs", "3", "--lr", "3e-3", "--batch-tokens", "512",
        "--no-progress", "--no-tensorboard", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    after = _chunk_loss(str(out / "model"), xt["chat"], mode)
    assert after < before, (before, after)
    assert AutoTokenizer.from_pretrained(str(out / "model")).vocab_size == \
        AutoTokenizer.from_pretrained(xt["student"]).vocab_size
    run = json.load(open(out / "run.json"))
    assert run["config"]["loss"]["cross_tokenizer"] == mode
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(math.isfinite(m[mode]) and m["chunks"] > 0 for m in metrics)


@pytest.mark.parametrize("mode", ["alm", "gold"])
def test_fused_and_unfused_heads_train_to_the_same_weights(xt, mode, tmp_path):
    """Three steps of `train-student --cross-tokenizer` (2 micro-batches each) through the
    fused LM head and with --no-fused-head end at the same weights."""
    from safetensors.torch import load_file

    from cli.main import main

    weights = []
    for extra in ((), ("--no-fused-head",)):
        out = tmp_path / f"run{len(weights)}"
        r = CliRunner().invoke(main, [
            "train-student", "--cache", xt["chat"], "--student", xt["student"], "-o",
            str(out), "--cross-tokenizer", mode, "--ce-weight", "0.5", "--max-steps", "3",
            "--grad-accum", "2", "--batch-tokens", "256", "--lr", "1e-3", "--num-workers",
            "0", "--no-progress", "--no-tensorboard", "--device", "cpu", *extra])
        assert r.exit_code == 0, r.output
        weights.append(load_file(out / "model" / "model.safetensors"))
    first = load_file(os.path.join(xt["student"], "model.safetensors"))
    assert max(float((weights[0][k] - first[k]).abs().max()) for k in first) > 1e-4
    for k in weights[0]:
        assert float((weights[0][k] - weights[1][k]).abs().max()) <= 1e-5, k


def test_refusals_in_one_line(xt, tmp_path):
    """Another tokenizer without the flag names the flag; a normalising student tokenizer
    is refused rather than aligned wrong; a sampled cache cannot give uld its top-k."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cli.main import main

    def train(*extra, student=xt["student"], cache=xt["chat"]):
        return CliRunner().invoke(main, [
            "train-student", "--cache", cache, "--student", student, "-o",
            str(tmp_path / f"run{len(os.listdir(tmp_path))}"), "--max-steps", "1",
            "--no-progress", "--no-tensorboard", "--device", "cpu", *extra])

    r = train()
    assert r.exit_code != 0 and "--cross-tokenizer alm|uld|gold" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(tiny.synthetic_sentences(200), trainer=trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    sp = str(tmp_path / "sp")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(sp)
    tiny.build_model(sp, 120)
    r = train("--cross-tokenizer", "alm", student=sp)
    assert r.exit_code != 0 and "needs a byte-level student tokenizer" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_kdtrainer_and_the_datasets_view_with_another_tokenizer(xt, tmp_path):
    """The HF route: the datasets view + cross_tokenizer_collator + KDTrainer. Its loss on a
    batch is the loader path's loss on the same batch, and a short run lowers it."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from atkd_cache.hf import KDTrainer, cache_dataset, cross_tokenizer_collator
    from atkd_cache.losses.crosstok import crosstok_loss
    from atkd_cache.losses.kd import LossConfig
    from atkd_cache.train.student import RowLogits
    from atkd_cache.train.trainer import chunk_teacher

    tok = AutoTokenizer.from_pretrained(xt["student"])
    collator = cross_tokenizer_collator(xt["chat"], tok)
    rows = list(cache_dataset(xt["chat"]).take(4))
    batch = collator(rows)
    assert batch["labels"].view(-1)[batch["rows"] + 1].tolist() == batch["target_ids"].tolist()
    cfg = LossConfig(cross_tokenizer="gold")
    model = AutoModelForCausalLM.from_pretrained(xt["student"], dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4,
                             max_steps=12, learning_rate=3e-3, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = KDTrainer(model=model, args=args, loss=cfg, train_dataset=cache_dataset(
        xt["chat"]), data_collator=collator)
    with torch.no_grad():
        mine = trainer.compute_loss(model, batch)
        logits = RowLogits(model)(batch["input_ids"], batch["rows"],
                                  attention_mask=batch["attention_mask"])
        theirs = crosstok_loss(logits, chunk_teacher(batch, torch.device("cpu")), cfg).loss
    torch.testing.assert_close(mine, theirs)
    before = _chunk_loss(xt["student"], xt["chat"], "gold")
    trainer.train()
    trainer.save_model(str(tmp_path / "hf-model"))
    tok.save_pretrained(str(tmp_path / "hf-model"))
    assert _chunk_loss(str(tmp_path / "hf-model"), xt["chat"], "gold") < before
    logged = [h for h in trainer.state.log_history if "kd/gold" in h]
    assert logged and all(h["kd/chunks"] > 0 for h in logged)


def test_init_student_moves_embeddings_to_another_tokenizer(assets, xt, tmp_path):
    """init-student --tokenizer: each new token's embedding is the mean of the old embeddings
    of its text's old tokens (a token both vocabularies share keeps its own; a shared chat
    marker too); the tied head follows; the student loads with the new tokenizer."""
    from transformers import AutoModelForCausalLM

    from atkd_cache.train.student import init_student

    init_student(assets["llama"], "1", str(tmp_path / "s"), tokenizer=xt["student"])
    old = AutoModelForCausalLM.from_pretrained(assets["llama"])
    new = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s"))
    old_tok, new_tok = (AutoTokenizer.from_pretrained(p) for p in (assets["llama"],
                                                                    tmp_path / "s"))
    assert len(new_tok) == len(AutoTokenizer.from_pretrained(xt["student"]))
    e_old, e_new = old.get_input_embeddings().weight, new.get_input_embeddings().weight
    assert e_new.shape[0] >= len(new_tok)
    checked = 0
    for token, i in new_tok.get_vocab().items():
        text = new_tok.convert_tokens_to_string([token])
        if "\ufffd" in text:
            continue
        ids = ([old_tok.convert_tokens_to_ids(token)] if token in old_tok.get_added_vocab()
               else old_tok(text, add_special_tokens=False)["input_ids"])
        torch.testing.assert_close(e_new[i], e_old[ids].mean(0))
        if not new.config.tie_word_embeddings:  # an untied head moves the same way
            torch.testing.assert_close(new.get_output_embeddings().weight[i],
                                       old.get_output_embeddings().weight[ids].mean(0))
        checked += len(ids) > 1
    assert checked > 50  # tokens made of several old tokens were averaged
    if new.config.tie_word_embeddings:
        assert new.get_output_embeddings().weight.data_ptr() == e_new.data_ptr()


def test_bits_per_byte_against_a_plain_forward(xt, assets):
    """With the teacher's own tokenizer, bits per byte is the plain model's CE in bits over
    the supervised tokens (the first one of a sequence aside) divided by their bytes; the
    teacher's figure is its cached log-probs over the same tokens."""
    from atkd_cache.models import load_causal_lm
    from atkd_cache.train.evaluate import bits_per_byte

    cache = open_cache(xt["chat"])
    text = load_text(cache)
    tok = AutoTokenizer.from_pretrained(assets["llama"])
    model = load_causal_lm(assets["llama"], dtype="fp32", device="cpu").eval()
    got = bits_per_byte(model, xt["chat"], Aligner(text.table, tok), batch_size=5)
    nats = t_nats = 0.0
    n_bytes = 0
    with torch.no_grad():
        for seq in cache:
            ids = torch.as_tensor(seq.input_ids)[None].long()
            lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            for k, t in enumerate(np.flatnonzero(seq.supervised)):
                if t == 0:
                    continue
                nats -= float(lp[t, ids[0, t + 1]])
                t_nats -= float(seq.target_logprob[k])
                n_bytes += len(text.table[int(ids[0, t + 1])])
    assert got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert got["teacher_bits_per_byte"] == pytest.approx(t_nats / math.log(2) / n_bytes,
                                                          rel=1e-6)


def test_an_nfc_student_is_byte_level_and_refuses_text_it_would_change(xt, assets, tmp_path):
    """Qwen-style tokenizers normalise with NFC: allowed (NFC text is left as it is), but a
    sequence whose text is not NFC would come back with other bytes: one line, never a
    misalignment."""
    from types import SimpleNamespace

    from tokenizers import normalizers

    from atkd_cache.cache.text import is_byte_level

    tok = AutoTokenizer.from_pretrained(xt["student"])
    tok.backend_tokenizer.normalizer = normalizers.NFC()
    assert is_byte_level(tok)
    teacher = AutoTokenizer.from_pretrained(assets["llama"])
    aligner = Aligner(token_bytes(teacher), tok)

    def seq(text):
        ids = np.asarray(teacher(text, add_special_tokens=False)["input_ids"])
        return SimpleNamespace(seq_id=7, input_ids=ids, supervised=np.ones(len(ids) - 1, bool),
                               target_logprob=np.zeros(len(ids) - 1, np.float32))

    assert len(aligner.align(seq("caf\u00e9 au lait")).teacher_ll) > 0  # NFC already
    with pytest.raises(UserError, match="sequence 7.*NFC"):
        aligner.align(seq("cafe\u0301 au lait"))  # e + combining accent: NFC changes it


def test_concat_keeps_the_text(assets, tmp_path):
    """Joined caches keep their (shared) tokenizer: the joined cache gives back each part's
    bytes."""
    from atkd_cache.cache.concat import concat_caches

    dump(assets, tmp_path / "a", shape="chat", limit=5)
    dump(assets, tmp_path / "b", shape="chat", limit=9)
    joined = concat_caches([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "ab"))
    text, part = load_text(joined), load_text(open_cache(str(tmp_path / "b")))
    assert text.table == part.table
    assert text.sequence_bytes(joined[7].input_ids) == part.sequence_bytes(
        open_cache(str(tmp_path / "b"))[2].input_ids)


def test_packed_and_padded_aligned_batches_give_the_same_rows(xt):
    """collate_aligned with pack=True (one row, position ids) and pack=False (padded) hold the
    same targets and chunks, and the student's log-probs at the rows agree."""
    from atkd_cache.models import load_causal_lm
    from atkd_cache.train.loader import collate_aligned
    from atkd_cache.train.student import RowLogits

    cache = open_cache(xt["chat"])
    aligner = Aligner(load_text(cache).table, AutoTokenizer.from_pretrained(xt["student"]))
    seqs = [cache[i] for i in range(5)]
    aligned = [aligner.align(s) for s in seqs]
    padded = collate_aligned(seqs, aligned, False, aligner.vocab_map)
    packed = collate_aligned(seqs, aligned, True, aligner.vocab_map)
    for key in ("target_ids", "chunk.chunk_of_row", "chunk.teacher_ll", "chunk.first_row",
                "chunk.support_student_ids", "group_offsets"):
        assert torch.equal(padded[key], packed[key]), key
    net = RowLogits(load_causal_lm(xt["student"], dtype="fp32", device="cpu").eval())
    with torch.no_grad():
        a = net(padded["input_ids"], padded["rows"], attention_mask=padded["attention_mask"])
        b = net(packed["input_ids"], packed["rows"], position_ids=packed["position_ids"])
    torch.testing.assert_close(torch.log_softmax(a, -1), torch.log_softmax(b, -1),
                               rtol=1e-4, atol=1e-4)
