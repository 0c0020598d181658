"""`dump-teacher --generate`: teacher-written replies with the distribution captured while
generating. Every captured array is checked against a plain teacher-forced re-scoring of the
finished sequence; token choices against plain references of greedy and nucleus sampling;
kill -9 + resume and a 2-rank torchrun against one uninterrupted process; one line per bad
input; the responses export; generated caches in the datasets view and the trainer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from atkd_cache import tiny
from atkd_cache.cache import open_cache
from atkd_cache.cache.inspect import verify_cache
from atkd_cache.cli.main import main
from atkd_cache.models import load_causal_lm
from atkd_cache.teacher.generate import nucleus_choice
from conftest import dump, rescore

CLI = [sys.executable, "-m", "atkd_cache.cli.main"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GEN = {"generate": True, "num_responses": 2, "max_new_tokens": 12, "gen_temperature": 0.7,
       "top_p": 0.9, "logprob_dtype": "float32", "shard_positions": 60}


@pytest.fixture(scope="module")
def teacher(assets, tmp_path_factory):
    """The tiny Llama with a hostile generation config of its own (sampling, a repetition
    penalty, top-k 3, no-repeat n-grams): none of it may reach the captured logits. Its EOS
    list adds the token the model predicts most often, so that some replies end early."""
    from transformers import AutoTokenizer, GenerationConfig

    folder = tmp_path_factory.mktemp("gen") / "teacher"
    shutil.copytree(assets["llama"], folder)
    model = load_causal_lm(str(folder), "fp32")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok("the cat sat on the mat")["input_ids"]])
    with torch.no_grad():
        common = int(torch.bincount(model(ids).logits[0].argmax(-1)).argmax())
    GenerationConfig(do_sample=True, temperature=0.3, top_k=3, repetition_penalty=1.8,
                     no_repeat_ngram_size=2, bos_token_id=1, pad_token_id=0,
                     eos_token_id=[2, common]).save_pretrained(folder)
    return {**assets, "gen": str(folder)}


@pytest.fixture(scope="module")
def generated(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    dump(teacher, root / "topk", shape="chat", model="gen", **GEN)
    dump(teacher, root / "sampled", shape="prompt_response", model="gen", mode="sampled",
         num_samples=16, sample_seed=3, **GEN)
    return {"topk": open_cache(root / "topk"), "sampled": open_cache(root / "sampled"),
            "root": root}


def test_generated_sequences_are_prompt_plus_reply(generated, teacher):
    cache = generated["topk"]
    card = cache.card
    assert card.generated and card.generation["num_responses"] == 2
    assert card.generation["temperature"] == 0.7 and card.temperature == 1.0
    eos = set(card.generation["eos_token_ids"])
    assert len(eos) == 2
    rows = [json.loads(x) for x in open(teacher["chat"])]
    assert len(cache) == 2 * len(rows) and [s.seq_id for s in cache] == list(range(len(cache)))
    ended = 0
    for seq in cache:
        sup = seq.supervised
        start = int(sup.argmax())
        assert sup[start:].all() and not sup[:start].any()  # one block: the reply
        reply = seq.input_ids[start + 1:]
        assert 1 <= len(reply) <= 12
        # EOS ends a reply (and is supervised); a reply without one used the whole budget
        assert not eos & set(reply[:-1].tolist())
        ended += int(reply[-1]) in eos
        assert int(reply[-1]) in eos or len(reply) == 12
    assert 0 < ended < len(cache)  # both kinds are covered
    from atkd_cache.cache.inspect import cache_info

    info = cache_info(cache)
    assert info["truncated_responses"] == len(cache) - ended
    assert info["response_tokens"]["mean"] == pytest.approx(cache.num_supervised / len(cache))
    first, second = cache[0], cache[1]  # two replies to one prompt: same prompt, own seeds
    p = int(first.supervised.argmax()) + 1
    assert np.array_equal(first.input_ids[:p], second.input_ids[:p])
    assert not np.array_equal(first.input_ids, second.input_ids)
    assert verify_cache(cache) == []  # the data fingerprint is the prompts', recomputed


def test_captured_arrays_equal_teacher_forced_rescoring(generated, teacher):
    model = load_causal_lm(teacher["gen"], "fp32")
    worst_tempered = 0.0
    for seq in generated["topk"]:
        ref = rescore(model, seq, k=8)
        for name in ("target_logprob", "entropy", "uncertainty"):
            np.testing.assert_allclose(getattr(seq, name), ref[name], atol=1e-4, err_msg=name)
        np.testing.assert_allclose(seq.topk_logprobs, ref["topk_logprobs"], atol=1e-4)
        same = seq.topk_ids == ref["topk_ids"]
        tied = np.isclose(seq.topk_logprobs, ref["topk_logprobs"][:, -1:], atol=1e-4)
        assert (same | tied).all()  # ids equal but where tied at the k-th value
        # what would have been captured from the processed (temperature 0.7) logits
        ids = torch.from_numpy(seq.input_ids.astype(np.int64))
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0, :-1]
        tempered = torch.log_softmax(logits / 0.7, -1)[torch.from_numpy(seq.supervised)]
        lp = tempered.gather(1, ids[1:][torch.from_numpy(seq.supervised)][:, None])[:, 0].numpy()
        worst_tempered = max(worst_tempered, float(np.abs(lp - seq.target_logprob).max()))
    assert worst_tempered > 0.05  # the check above tells raw from processed logits


def draw_counts(sizes, ids, counts) -> list[dict[int, int]]:
    """Per position, {id: draws} from the flat sampled arrays."""
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64))
    return [dict(zip(ids[e - n: e].tolist(), counts[e - n: e].tolist(), strict=True))
            for n, e in zip(np.asarray(sizes, dtype=np.int64), ends, strict=True)]


def test_sampled_mode_draws_equal_rescoring_with_the_same_uniforms(generated, teacher):
    model = load_causal_lm(teacher["gen"], "fp32")
    cache = generated["sampled"]
    assert cache.card.mode == "sampled" and cache.card.generated
    positions = moved = 0
    for seq in cache:
        ref = rescore(model, seq, k=0, num_samples=16, sample_seed=3)
        np.testing.assert_allclose(seq.target_logprob, ref["target_logprob"], atol=1e-4)
        got = draw_counts(seq.sample_sizes, seq.sample_ids, seq.sample_counts)
        want = draw_counts(ref["sample_sizes"], ref["sample_ids"], ref["sample_counts"])
        for a, b in zip(got, want, strict=True):
            positions += 1
            if a != b:  # a uniform a rounding error away from a CDF step: one draw moves
                moved += 1
                assert sum(abs(a.get(i, 0) - b.get(i, 0)) for i in a | b) == 2, (a, b)
    # the same uniforms, the same draws, but where KV-cached and full-pass logits round apart
    assert positions > 400 and moved <= positions // 100


def test_nucleus_choice_equals_a_plain_reference():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 40, generator=gen, dtype=torch.float64) * 3
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.5, 0.05)):
        got = nucleus_choice(z, u, temperature, top_p).tolist()
        for row in range(len(z)):
            p = np.exp(z[row].numpy() / temperature)
            p /= p.sum()
            order = sorted(range(len(p)), key=lambda i: -p[i])
            kept, mass = [], 0.0
            for i in order:  # the smallest top set holding >= top_p
                kept.append(i)
                mass += p[i]
                if mass >= top_p:
                    break
            point, acc = float(u[row]) * mass, 0.0
            for i in sorted(kept):  # inverse CDF in vocabulary order
                acc += p[i]
                if acc > point:
                    break
            assert got[row] == i, (temperature, top_p, row)


def test_greedy_replies_equal_a_plain_argmax_loop_and_do_not_depend_on_batching(
        teacher, tmp_path):
    dump(teacher, tmp_path / "b1", shape="prompt_response", model="gen", generate=True,
         greedy=True, max_new_tokens=10, batch_size=1, limit=6)
    dump(teacher, tmp_path / "b4", shape="prompt_response", model="gen", generate=True,
         greedy=True, max_new_tokens=10, batch_size=4, limit=6)
    one, four = open_cache(tmp_path / "b1"), open_cache(tmp_path / "b4")
    assert one.card.generation["temperature"] == 0.0 and one.card.generation["greedy"]
    model = load_causal_lm(teacher["gen"], "fp32")
    eos = set(one.card.generation["eos_token_ids"])
    for a, b in zip(one, four, strict=True):
        assert np.array_equal(a.input_ids, b.input_ids)
        np.testing.assert_allclose(a.target_logprob, b.target_logprob, atol=1e-4)
        start = int(a.supervised.argmax()) + 1
        ids = a.input_ids[:start].astype(np.int64).tolist()
        with torch.no_grad():
            while len(ids) < start + 10:
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] in eos:
                    break
        assert ids == a.input_ids.tolist()


def test_sampled_replies_do_not_depend_on_batching(teacher, tmp_path):
    kw = {**GEN, "limit": 8}
    dump(teacher, tmp_path / "b1", shape="chat", model="gen", batch_size=1, **kw)
    dump(teacher, tmp_path / "b8", shape="chat", model="gen", batch_size=8, **kw)
    for a, b in zip(open_cache(tmp_path / "b1"), open_cache(tmp_path / "b8"), strict=True):
        assert np.array_equal(a.input_ids, b.input_ids)


def cli_args(teacher, data, out, *extra):
    return ["dump-teacher", "--model", teacher["gen"], "--data", data, "--messages-field",
            "messages", "-o", str(out), "--top-k", "8", "--dtype", "fp32", "--batch-size", "4",
            "--generate", "--num-responses", "2", "--max-new-tokens", "12",
            "--gen-temperature", "0.8", "--shard-positions", "48", "--no-progress", *extra]


def arrays(path):
    cache = open_cache(path)
    return {k: cache.column(k) for k in cache.array_names}


def test_kill_9_resume_and_two_ranks_equal_one_process(teacher, tmp_path):
    data = tiny.write_datasets(str(tmp_path / "data"), n=40, seed=4)["chat"]
    ref = tmp_path / "ref"
    subprocess.run(CLI + cli_args(teacher, data, ref), check=True, env=ENV, capture_output=True)
    expected, n_shards = arrays(ref), len(open_cache(ref).shard_rows)
    assert n_shards == 20

    out = tmp_path / "killed"
    proc = subprocess.Popen(CLI + cli_args(teacher, data, out), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest, deadline = out / "manifest.parquet", time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if manifest.exists() and pq.read_metadata(manifest).num_rows >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = open_cache(out)
    assert 2 <= len(partial.shard_rows) < n_shards and verify_cache(partial) == []
    r = subprocess.run(CLI + cli_args(teacher, data, out), env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "resuming after" in r.stderr, r.stderr[-2000:]
    both = tmp_path / "torchrun"
    r = subprocess.run(TORCHRUN + ["--nproc_per_node", "2", "-m", "atkd_cache.cli.main",
                                   *cli_args(teacher, data, both)], env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for got in (out, both):
        a = arrays(got)
        assert a.keys() == expected.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], expected[k], err_msg=f"{got.name}: {k}")
        assert verify_cache(open_cache(got)) == []

    # the same cache asked for with another generation setting is refused, naming it
    r = CliRunner().invoke(main, cli_args(teacher, data, ref)[:-1] + ["--top-p", "0.5",
                                                                      "--no-progress"])
    assert r.exit_code == 2 and "generation.top_p" in r.output, r.output


@pytest.mark.parametrize("case", ["no_room", "empty_prompt", "plain_text", "n_zero",
                                  "no_user_turn", "over_the_model"])
def test_bad_generation_input_is_one_line_and_writes_nothing(teacher, tmp_path, case):
    out = tmp_path / "cache"
    base = ["dump-teacher", "--model", teacher["gen"], "-o", str(out), "--dtype", "fp32",
            "--generate", "--no-progress"]
    chat = ["--data", teacher["chat"], "--messages-field", "messages"]
    bad = tmp_path / "bad.jsonl"
    if case == "no_room":
        args, expect = chat + ["--max-length", "40", "--max-new-tokens", "30"], "leaves no room"
    elif case == "empty_prompt":
        bad.write_text(json.dumps({"prompt": "a cat"}) + "\n" + json.dumps({"prompt": " "})
                       + "\n")
        args, expect = ["--data", str(bad), "--prompt-field", "prompt"], "row 1"
    elif case == "plain_text":
        args, expect = ["--data", teacher["text"], "--text-field", "text"], "needs prompts"
    elif case == "over_the_model":  # the tiny teacher takes 512 positions
        args, expect = chat + ["--max-new-tokens", "500"], "over the teacher's 512"
    elif case == "n_zero":
        args, expect = chat + ["--num-responses", "0"], "--num-responses must be at least 1"
    else:
        bad.write_text(json.dumps({"messages": [{"role": "system", "content": "hi"}]}) + "\n")
        args, expect = ["--data", str(bad), "--messages-field", "messages"], "no non-empty user"
    r = CliRunner().invoke(main, base + args)
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], r.output
    assert "Traceback" not in r.output and not out.exists()


def test_export_responses(generated, teacher, tmp_path):
    out = tmp_path / "responses.jsonl"
    r = CliRunner().invoke(main, ["export", str(generated["root"] / "topk"), "--format",
                                  "responses", "-o", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    cache = generated["topk"]
    eos = set(cache.card.generation["eos_token_ids"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher["gen"])
    assert len(rows) == len(cache) and f"{sum(r['truncated'] for r in rows)} truncated" in r.output
    for row, seq in zip(rows, cache, strict=True):
        assert row["seq_id"] == seq.seq_id
        assert (row["prompt_index"], row["response_index"]) == divmod(seq.seq_id, 2)
        assert row["prompt_ids"] + row["completion_ids"] == seq.input_ids.tolist()
        assert row["truncated"] == (row["completion_ids"][-1] not in eos)
        body = row["completion_ids"] if row["truncated"] else row["completion_ids"][:-1]
        assert row["completion"] == tok.decode(body, skip_special_tokens=False)
        assert row["prompt"].endswith("<|im_start|>assistant\n")
    given = tmp_path / "given"
    dump(teacher, given, shape="chat", model="gen")
    r = CliRunner().invoke(main, ["export", str(given), "--format", "responses", "-o",
                                  str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2 and "dump-teacher --generate" in r.output
    assert not (tmp_path / "x.jsonl").exists()


def test_generated_cache_in_the_datasets_view_and_the_trainer(generated, teacher, tmp_path):
    from atkd_cache.hf import cache_dataset

    cache = generated["topk"]
    ds = cache_dataset(str(generated["root"] / "topk"), streaming=False)
    assert len(ds) == len(cache)
    assert ds[3]["input_ids"] == cache[3].input_ids.tolist()
    from atkd_cache.hf.axolotl import export_axolotl

    s = export_axolotl(str(generated["root"] / "topk"), str(tmp_path / "ax"), progress=False)
    assert s["rows"] == len(cache) and s["supervised_positions"] == cache.num_supervised
    student = str(tmp_path / "student")
    tiny.build_tokenizer(student)
    tiny.build_model(student, teacher["vocab"], seed=2)
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train-student", "--cache", str(generated["root"] / "topk"),
                                  "--student", student, "-o", str(run), "--loss", "atkd",
                                  "--max-steps", "2", "--batch-tokens", "512", "--device",
                                  "cpu", "--no-progress", "--no-tensorboard"])
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(x["loss"]) for x in records)


def test_evaluate_scores_student_replies_against_the_teachers(teacher, tmp_path):
    """rouge_l_to_teacher and teacher_logprob against a plain reference: greedy argmax loops
    for both models' replies, then the teacher's log_softmax over each student reply."""
    from transformers import AutoTokenizer

    from atkd_cache.data import DataSpec, generation_prompts, load_rows
    from atkd_cache.train.evaluate import EvalConfig, evaluate, rouge_l

    student = str(tmp_path / "student")
    tiny.build_tokenizer(student)
    tiny.build_model(student, teacher["vocab"], seed=5)
    spec = DataSpec(source=teacher["prompt_response"], prompt_field="prompt",
                    response_field="response", limit=4)
    got = evaluate(EvalConfig(model=student, data=spec, teacher=teacher["llama"],
                              max_new_tokens=8, device="cpu"))
    tok = AutoTokenizer.from_pretrained(student)
    pairs = generation_prompts(load_rows(spec), tok, spec)
    models = {name: load_causal_lm(path, "fp32")
              for name, path in (("student", student), ("teacher", teacher["llama"]))}

    def greedy(model, prompt):
        ids = list(prompt)
        with torch.no_grad():
            while len(ids) < len(prompt) + 8:
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == tok.eos_token_id:
                    break
        return ids[len(prompt):]

    replies = {name: [greedy(m, p) for p, _ in pairs] for name, m in models.items()}
    text = {name: [tok.decode(r, skip_special_tokens=True).strip() for r in rs]
            for name, rs in replies.items()}
    assert got["student"]["rouge_l_to_teacher"] == pytest.approx(
        rouge_l(text["student"], text["teacher"]))
    means = []
    for (prompt, _), reply in zip(pairs, replies["student"], strict=True):
        with torch.no_grad():
            logits = models["teacher"](input_ids=torch.tensor([prompt + reply])).logits[0]
        lp = torch.log_softmax(logits.double(), -1)
        means.append(np.mean([float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(reply)]))
    assert got["student"]["teacher_logprob"] == pytest.approx(np.mean(means), abs=1e-5)
    assert got["teacher"]["teacher_logprob"] > got["student"]["teacher_logprob"]
    for name, rs in replies.items():  # the replies' shape, from the same greedy replies
        stopped = [bool(r) and r[-1] == tok.eos_token_id for r in rs]
        shares = []
        for r, s in zip(rs, stopped, strict=True):
            body = r[:-1] if s else r
            grams = [tuple(body[i:i + 3]) for i in range(len(body) - 2)]
            if grams:
                shares.append(len(set(grams)) / len(grams))
        assert got[name]["stop_rate"] == pytest.approx(np.mean(stopped))
        assert got[name]["reply_tokens"] == pytest.approx(np.mean([len(r) for r in rs]))
        assert got[name]["distinct_3"] == pytest.approx(np.mean(shares))


def test_reply_shape_tells_loops_and_stops():
    from atkd_cache.train.evaluate import reply_shape, shape_summary

    eos = 2
    replies = [[5, 6, 7, 5, 6, 7, 5, 6, 7], [5, 6, 7, 8, eos], [9, eos], []]
    shape = reply_shape(replies, {eos})
    assert shape["stopped"] == [0.0, 1.0, 1.0, 0.0]
    assert shape["reply_tokens"] == [9.0, 5.0, 2.0, 0.0]
    # the loop: 7 three-grams, 3 distinct; the stopped one: (5,6,7), (6,7,8) without its EOS
    assert shape["distinct_3"][:2] == [3 / 7, 1.0] and all(np.isnan(shape["distinct_3"][2:]))
    summary = shape_summary(shape)
    assert summary == {"reply_tokens": 4.0, "stop_rate": 0.5,
                       "distinct_3": pytest.approx((3 / 7 + 1) / 2)}
