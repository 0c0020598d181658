"""A cross-tokenizer student that renders chats with its own chat template (issue 32,
train/chat_render.py): the teacher's rendering parsed back into messages and rendered by the
student's template, against the student's own apply_chat_template; the loader's chunks
against a byte-by-byte reference; `train-student --student-chat-template`; the refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from atkd_cache import tiny
from atkd_cache.cache import open_cache
from atkd_cache.cache.text import load_text, token_bytes
from atkd_cache.errors import UserError
from atkd_cache.train.align import Aligner
from atkd_cache.train.chat_render import Rerender, learn_template
from conftest import dump

# ChatML that writes a default system prompt when the chat has none (as SmolLM2's does)
DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are kind.<|im_end|>\n"
    "{% endif %}" + tiny.CHAT_TEMPLATE)
TRIMMING = tiny.LLAMA3_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
CHATS = [
    [{"role": "user", "content": "Café 東京 🙂 hi"},
     {"role": "assistant", "content": "The cat sat on a mat."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12 + 30 = ?"},
     {"role": "assistant", "content": "It is 42 👩\u200d💻."},
     {"role": "user", "content": "and   then\ttabs?"},
     {"role": "assistant", "content": "The dog ran  to the house."}],
    [{"role": "user", "content": "what is it"}, {"role": "assistant", "content": "Über straße"},
     {"role": "user", "content": "why"}, {"role": "assistant", "content": "Because."}],
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")

    def build(name, **kw):
        return AutoTokenizer.from_pretrained(tiny.build_tokenizer(str(root / name), **kw))

    return {
        "chatml": build("chatml", vocab_size=400, seed=1, chat_template=DEFAULT_SYSTEM),
        "llama3": build("llama3", vocab_size=420, seed=5, chat_template=tiny.LLAMA3_TEMPLATE,
                        markers=tiny.LLAMA3_MARKERS),
        "trim": build("trim", vocab_size=420, seed=5, chat_template=TRIMMING,
                      markers=tiny.LLAMA3_MARKERS),
    }


def endings(chat, tok):
    """A teacher text for each way a cached chat can end, with what the student's own
    template should render for it: complete, a reply ended by the end-of-turn token (as a
    model stops), a reply cut by the budget, and a text cut inside a later prompt."""
    render = tok.apply_chat_template
    reply = chat[-1]["content"]
    asked = render(chat[:-1], tokenize=False, add_generation_prompt=True)
    return {
        "end": (render(chat, tokenize=False), chat, None),
        "eot": (asked + reply + "<|im_end|>", chat[:-1], (reply, "<|eot_id|>")),
        "cut": (asked + reply[:5], chat[:-1], (reply[:5], "")),
        "prompt": (render(chat, tokenize=False) + "<|im_start|>user\nhal", chat, None),
    }


def test_the_student_reads_its_own_rendering_and_pairs_only_the_same_bytes(toks):
    """Every ending of every chat: the student's text is what its own apply_chat_template
    writes (the teacher's default system prompt gone), every content pair holds the same
    bytes on both sides, one pair per message, and each reply's end-of-turn pair is
    <|im_end|> with <|eot_id|>."""
    rerender = Rerender(toks["chatml"], toks["llama3"])
    student = toks["llama3"].apply_chat_template
    for chat in CHATS:
        for ending, (text, rendered, reply) in endings(chat, toks["chatml"]).items():
            got = rerender(text, "test")
            want = student(rendered, tokenize=False, add_generation_prompt=reply is not None)
            want += "".join(reply or ())
            assert got.text == want, (ending, got.text)
            assert "You are kind." not in got.text and "<|im_start|>" not in got.text
            t_bytes, s_bytes = text.encode(), got.text.encode()
            content = [p for p in got.pairs if not p[4]]
            assert len(content) == len(rendered) + (reply is not None)
            for t_lo, t_hi, s_lo, s_hi, whole in got.pairs:
                a, b = t_bytes[t_lo:t_hi], s_bytes[s_lo:s_hi]
                assert (a, b) == (b"<|im_end|>", b"<|eot_id|>") if whole else a == b
            turns = [m["content"].encode() for m in chat]
            assert [t_bytes[p[0]:p[1]] for p in content] == turns[:len(content) - 1] + [
                (reply[0] if reply else chat[len(content) - 1]["content"]).encode()]
            ends = sum(p[4] for p in got.pairs)
            replies = sum(m["role"] == "assistant" for m in chat)
            assert ends == replies - (ending == "cut")


def test_templates_and_texts_that_cannot_be_paired_are_refused(toks, tmp_path):
    """A student template that trims a reply; a text that is not a chat rendering; a
    tokenizer without a chat template; a template that renders no user/assistant chat."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " padded "}]
    text = toks["chatml"].apply_chat_template(chat, tokenize=False)
    with pytest.raises(UserError, match="message 1's bytes differ after the student's chat "
                                        "template renders it"):
        Rerender(toks["chatml"], toks["trim"])(text, "sequence 3")
    trimmed = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "tidy"}]
    assert Rerender(toks["chatml"], toks["trim"])(toks["chatml"].apply_chat_template(
        trimmed, tokenize=False), "s").text.endswith("tidy<|eot_id|>")  # nothing to trim
    with pytest.raises(UserError, match="sequence 4: its text is not the teacher's chat"):
        Rerender(toks["chatml"], toks["llama3"])("The cat sat on a mat.", "sequence 4")
    bare = AutoTokenizer.from_pretrained(tiny.build_tokenizer(str(tmp_path / "bare")))
    bare.chat_template = None
    with pytest.raises(UserError, match="the student's tokenizer has no chat template"):
        learn_template(bare, "the student's tokenizer")
    bare.chat_template = "{{ raise_exception('no chats here') }}"
    with pytest.raises(UserError, match="does not render a user/assistant conversation"):
        learn_template(bare, "the student's tokenizer")


@pytest.fixture(scope="module")
def xt_chat(assets, tmp_path_factory):
    """A multi-turn chat cache of the tiny ChatML teacher and a student with Llama 3's
    markers and template (another byte-level vocabulary, its own random model)."""
    root = tmp_path_factory.mktemp("xt-chat")
    chats = root / "chats.jsonl"
    rows = [{"messages": CHATS[i % len(CHATS)][:-2] + [
        {"role": "user", "content": f"turn {i}: {CHATS[(i + 1) % 3][0]['content']}"},
        {"role": "assistant", "content": f"{CHATS[i % 3][-1]['content']} ({i * 7})"}]}
        for i in range(12)]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dump({**assets, "chat": str(chats)}, root / "cache", shape="chat")
    student = str(root / "student")
    tiny.build_tokenizer(student, vocab_size=420, seed=5, chat_template=tiny.LLAMA3_TEMPLATE,
                         markers=tiny.LLAMA3_MARKERS)
    tiny.build_model(student, len(AutoTokenizer.from_pretrained(student)), seed=2)
    trim = str(root / "trim")
    tiny.build_tokenizer(trim, vocab_size=420, seed=5, chat_template=TRIMMING,
                         markers=tiny.LLAMA3_MARKERS)
    tiny.build_model(trim, len(AutoTokenizer.from_pretrained(trim)), seed=2)
    return {"cache": str(root / "cache"), "student": student, "trim": trim,
            "rows": [r["messages"] for r in rows]}


def byte_walk(t_spans, s_spans, t_range, s_range):
    """Chunks of one paired content span from the definition, byte by byte: offset o is a
    cut when both sides have a token wholly inside the span that starts (or ends) there;
    consecutive cuts close a chunk, holding the tokens between them on each side."""
    def inside(spans, lo, hi):
        return [(j, a - lo, b - lo) for j, (a, b) in enumerate(spans) if a >= lo and b <= hi]

    t_in, s_in = inside(t_spans, *t_range), inside(s_spans, *s_range)
    t_cuts = {a for _, a, _ in t_in} | {b for _, _, b in t_in}
    s_cuts = {a for _, a, _ in s_in} | {b for _, _, b in s_in}
    cuts = [o for o in range(t_range[1] - t_range[0] + 1) if o in t_cuts and o in s_cuts]
    out = []
    for x, y in zip(cuts, cuts[1:], strict=False):
        out.append(([j for j, a, b in t_in if a >= x and b <= y],
                    [j for j, a, b in s_in if a >= x and b <= y]))
    return out


def spans(ids, table):
    ends = np.cumsum([len(table[int(i)]) for i in ids])
    return list(zip(np.concatenate([[0], ends[:-1]]).tolist(), ends.tolist(), strict=True))


def test_the_loader_aligns_the_students_rendering_against_a_byte_walk(xt_chat):
    """Every sequence: the student's ids are its own apply_chat_template of the chat; the
    counted chunks are the byte walk's chunks inside each reply (supervised) plus the
    end-of-turn chunk, with the teacher's log-likelihood of exactly those tokens; every
    reply byte is in a counted chunk."""
    cache = open_cache(xt_chat["cache"])
    text = load_text(cache)
    s_tok = AutoTokenizer.from_pretrained(xt_chat["student"])
    s_table = token_bytes(s_tok)
    aligner = Aligner(text.table, s_tok, rerender=Rerender(text.tokenizer, s_tok))
    assert not len(aligner.prefix)
    split = 0
    for seq in cache:
        chat = xt_chat["rows"][seq.seq_id]
        got = aligner.align(seq)
        assert got.student_ids.tolist() == s_tok.apply_chat_template(chat, tokenize=True,
                                                                      return_dict=False)
        t_ids, s_ids = seq.input_ids.tolist(), got.student_ids.tolist()
        t_sp, s_sp = spans(t_ids, text.table), spans(s_ids, s_table)
        t_bytes = b"".join(text.table[i] for i in t_ids)
        s_bytes = b"".join(s_table[i] for i in s_ids)
        lp = dict(zip(np.flatnonzero(seq.supervised).tolist(), seq.target_logprob.tolist(),
                      strict=True))
        want = []  # (teacher log-likelihood, [(row, target)]) per counted chunk
        t_pos = s_pos = 0
        for m in chat:
            c = m["content"].encode()
            t_lo, s_lo = t_bytes.index(c, t_pos), s_bytes.index(c, s_pos)
            t_pos, s_pos = t_lo + len(c), s_lo + len(c)
            chunks = byte_walk(t_sp, s_sp, (t_lo, t_pos), (s_lo, s_pos))
            if m["role"] == "assistant":
                te = [j for j, (a, b) in enumerate(t_sp) if a == t_pos and b == t_pos + 10]
                se = [j for j, (a, b) in enumerate(s_sp) if a == s_pos and b == s_pos + 10]
                assert t_bytes[t_pos:t_pos + 10] == b"<|im_end|>" and te
                assert s_bytes[s_pos:s_pos + 10] == b"<|eot_id|>" and se
                chunks.append((te, se))
                for t_js, _ in chunks[:-1]:
                    assert all(j - 1 in lp for j in t_js)  # replies are supervised
            for t_js, s_js in chunks:
                if all(j - 1 in lp for j in t_js):
                    want.append((sum(lp[j - 1] for j in t_js),
                                 [(j - 1, s_ids[j]) for j in s_js]))
                    split += len(t_js) != len(s_js)
        assert len(got.teacher_ll) == len(want)
        for c, (ll, rows) in enumerate(want):
            assert got.teacher_ll[c] == pytest.approx(ll, abs=1e-9)
            mine = np.flatnonzero(got.chunk_of_row == c)
            assert [(int(got.rows[i]), int(got.target_ids[i])) for i in mine] == rows
        replies = sum(len(m["content"].encode()) + 10 for m in chat if m["role"] == "assistant")
        assert sum(got.chunk_bytes) == replies  # every reply byte and its end, once
    assert split > 0  # the tokenizations really differ inside the replies


def test_train_student_with_its_own_chat_template(xt_chat, tmp_path):
    """`train-student --cross-tokenizer alm --student-chat-template`: the student's chunk loss
    over its own renderings falls, run.json records the choice; the KDTrainer collator reads
    the same ids; the refusals are one line each."""
    import torch

    from atkd_cache.hf import cache_dataset, cross_tokenizer_collator
    from atkd_cache.losses.crosstok import crosstok_loss
    from atkd_cache.losses.kd import LossConfig
    from atkd_cache.models import load_causal_lm
    from atkd_cache.train.align import cache_aligner
    from atkd_cache.train.loader import collate_aligned
    from atkd_cache.train.student import RowLogits
    from atkd_cache.train.trainer import chunk_teacher
    from cli.main import main

    cache = open_cache(xt_chat["cache"])

    def loss_of(model: str) -> float:
        aligner = cache_aligner(cache, AutoTokenizer.from_pretrained(model), chat_template=True)
        net = RowLogits(load_causal_lm(model, dtype="fp32", device="cpu").eval())
        with torch.no_grad():
            b = collate_aligned(list(cache), [aligner.align(s) for s in cache], False,
                                aligner.vocab_map)
            logits = net(b["input_ids"], b["rows"], attention_mask=b["attention_mask"])
            return float(crosstok_loss(logits, chunk_teacher(b, torch.device("cpu")),
                                       LossConfig(cross_tokenizer="alm")).loss)

    def train(*extra, student=xt_chat["student"]):
        return CliRunner().invoke(main, [
            "train-student", "--cache", xt_chat["cache"], "--student", student, "-o",
            str(tmp_path / f"run{len(os.listdir(tmp_path))}"), "--no-progress",
            "--no-tensorboard", "--device", "cpu", *extra])

    r = train("--cross-tokenizer", "alm", "--student-chat-template", "--epochs", "4", "--lr",
              "3e-3", "--batch-tokens", "512")
    assert r.exit_code == 0, r.output
    out = tmp_path / "run0"
    assert json.load(open(out / "run.json"))["config"]["student_chat_template"] is True
    assert loss_of(str(out / "model")) < loss_of(xt_chat["student"])

    tok = AutoTokenizer.from_pretrained(xt_chat["student"])
    batch = cross_tokenizer_collator(xt_chat["cache"], tok, student_chat_template=True)(
        list(cache_dataset(xt_chat["cache"]).take(1)))
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert ids == tok.apply_chat_template(xt_chat["rows"][0], tokenize=True, return_dict=False)

    r = train("--student-chat-template", "--max-steps", "1")
    assert r.exit_code != 0 and "give --cross-tokenizer too" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    # the trimming template changes no reply here (none has outer spaces): it trains
    r = train("--cross-tokenizer", "alm", "--student-chat-template", "--max-steps", "1",
              student=xt_chat["trim"])
    assert r.exit_code == 0, r.output
