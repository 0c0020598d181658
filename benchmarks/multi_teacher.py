"""Two teachers, one student, on real assets: the student trained from teacher A's cache,
from teacher B's, and from both (mixture, confident), with the same budget; evaluated on
held-out caches of both teachers (NLL, and KL / top-1 agreement to each teacher).

Teacher A: SmolLM2-135M-Instruct (fp32). Teacher B: its layer-cut version, 24 of 30 layers
(`init-student --layers 24`, not healed): a weaker teacher of the same tokenizer. Student: the
6-layer cut of A (bench_train.py's). Data: chitchat chats (assistant turns supervised), the
training conversations from the start of the file, held-out ones from its end. Every arm:
ATKD (the defaults), the same steps, micro-batches, lr and seed; one seed, no lr search
(this shows the feature at work on real models; it is not a study of which mix is best).

Each stage skips what it already wrote (teachers, data, caches, runs, evaluations), so a
killed run resumes where it stopped. Results: --out (JSON); --report prints the table.

    python benchmarks/multi_teacher.py [--train 240] [--held-out 48] [--steps 60]
    python benchmarks/multi_teacher.py --report
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import click

sys.path.insert(0, os.path.dirname(__file__))

from atkd_cache.assets import smollm2_folder, write_chitchat_chats  # noqa: E402
from atkd_cache.data import DataSpec  # noqa: E402
from atkd_cache.dump import DumpConfig, dump_teacher  # noqa: E402
from atkd_cache.losses.kd import LossConfig  # noqa: E402
from atkd_cache.models import load_causal_lm  # noqa: E402
from atkd_cache.train import checkpoint  # noqa: E402
from atkd_cache.train.evaluate import cache_metrics  # noqa: E402
from atkd_cache.train.loader import LoaderConfig  # noqa: E402
from atkd_cache.train.student import init_student  # noqa: E402
from atkd_cache.train.trainer import TrainConfig, train  # noqa: E402

ARMS = {  # arm -> (caches, mix)
    "A only": (["A"], "mixture"),
    "B only": (["B"], "mixture"),
    "A+B mixture": (["A", "B"], "mixture"),
    "A+B confident": (["A", "B"], "confident"),
}


def stage(path: str, what: str, fn) -> str:
    """Run `fn` unless `path` exists (a stage already done)."""
    if not os.path.exists(path):
        t0 = time.perf_counter()
        fn()
        print(f"{what}: {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def resumable(run_dir: str) -> bool:
    """Resume a killed run from its checkpoint; one killed before its first checkpoint
    starts again."""
    if not os.path.isdir(run_dir):
        return False
    if checkpoint.latest_checkpoint(run_dir) is None:
        shutil.rmtree(run_dir)
        return False
    return True


def dump(teacher: str, data: str, out: str, max_length: int) -> str:
    spec = DataSpec(source=data, messages_field="messages", max_length=max_length)
    return stage(os.path.join(out, "complete.json"), f"dump {out}", lambda: dump_teacher(
        DumpConfig(model=teacher, data=spec, output=out, top_k=32, dtype="fp32",
                   progress=False, shard_positions=4096), log=lambda m: None))


def report(results: dict) -> str:
    """The markdown table of the results file."""
    lines = [
        f"Held-out: {results['held_out_tokens']} supervised tokens of {results['held_out']} "
        f"chitchat chats; every arm {results['steps']} ATKD steps of <= "
        f"{results['batch_tokens']} tokens, lr {results['lr']}, seed 0. On the "
        f"{results['train_tokens']} training positions `confident` takes teacher A at "
        f"{results['confident_share_A']:.0%} of them.",
        "",
        "| model | NLL | KL to A | top-1 agr. A | KL to B | top-1 agr. B |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["rows"].items():
        lines.append(f"| {name} | {r['nll']:.3f} | {r['kl_A']:.3f} | {r['agree_A']:.3f} | "
                     f"{r['kl_B']:.3f} | {r['agree_B']:.3f} |")
    t = results["teachers"]
    lines.append(f"| teacher A (ceiling) | {t['A']['nll']:.3f} | 0 | 1 | – | "
                 f"{t['A']['agree_other']:.3f} |")
    lines.append(f"| teacher B | {t['B']['nll']:.3f} | – | {t['B']['agree_other']:.3f} | 0 | "
                 f"1 |")
    r = results["rows"]
    start, arms = r["start (6-layer cut of A)"], [r[arm] for arm in ARMS]
    a, b, mix, conf = (r[arm] for arm in ARMS)
    lines += ["", (
        f"What this run shows, in the words one seed supports: every arm moves the student a "
        f"long way from its start (NLL {start['nll']:.1f} → "
        f"{min(x['nll'] for x in arms):.2f}–{max(x['nll'] for x in arms):.2f}), so the setup "
        f"has room to show differences. B alone gives KL to B {b['kl_B']:.3f} and to A "
        f"{b['kl_A']:.3f}, A alone {a['kl_B']:.3f} and {a['kl_A']:.3f}; `mixture` lands at "
        f"{mix['kl_B']:.3f} and {mix['kl_A']:.3f}. `confident` ends at NLL {conf['nll']:.3f} "
        f"against A alone's {a['nll']:.3f} (KL to A {conf['kl_A']:.3f} vs {a['kl_A']:.3f}). "
        f"With one seed and no lr search, differences of a few hundredths of a nat between "
        f"arms are not evidence that one mix beats another: the run is a working "
        f"demonstration, not a comparison.")]
    return "\n".join(lines)


def row_of(metrics: dict) -> dict:
    a, b = metrics["per_teacher"]
    return {"nll": metrics["student"]["nll"], "kl_A": a["student_kl_to_teacher"],
            "agree_A": a["student_top1_agreement"], "kl_B": b["student_kl_to_teacher"],
            "agree_B": b["student_top1_agreement"]}


@click.command()
@click.option("--train", "n_train", type=int, default=240, show_default=True,
              help="Training conversations.")
@click.option("--held-out", type=int, default=48, show_default=True)
@click.option("--steps", type=int, default=60, show_default=True)
@click.option("--batch-tokens", type=int, default=2048, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True)
@click.option("--workdir", default="runs/multi-teacher", show_default=True)
@click.option("--out", default="docs/multi_teacher.json", show_default=True)
@click.option("--report", "only_report", is_flag=True, help="Only print the table from --out.")
def main(n_train, held_out, steps, batch_tokens, lr, max_length, workdir, out, only_report):
    """Train one student from two teachers' caches and from each alone; print the table."""
    if only_report:
        with open(out) as f:
            print(report(json.load(f)))
        return
    os.makedirs(workdir, exist_ok=True)
    teacher_a = smollm2_folder(workdir)
    teacher_b = os.path.join(workdir, "teacher-b-24L")
    stage(teacher_b, "teacher B", lambda: init_student(teacher_a, "24", teacher_b))
    student = os.path.join(workdir, "student-6L")
    stage(student, "student", lambda: init_student(teacher_a, "6", student))
    data = {split: os.path.join(workdir, f"{split}.jsonl") for split in ("train", "held")}
    stage(data["train"], "train data", lambda: write_chitchat_chats(data["train"], n_train))
    stage(data["held"], "held-out data",
          lambda: write_chitchat_chats(data["held"], held_out, from_end=True))
    caches = {}
    for split in ("train", "held"):
        for name, teacher in (("A", teacher_a), ("B", teacher_b)):
            caches[split, name] = dump(teacher, data[split],
                                       os.path.join(workdir, f"cache-{split}-{name}"),
                                       max_length)
    held = [os.path.dirname(caches["held", "A"]), os.path.dirname(caches["held", "B"])]
    rows = {}
    start = os.path.join(workdir, "eval-start.json")
    for name, model_dir, path in [("start (6-layer cut of A)", student, start)] + [
            (arm, os.path.join(workdir, "run-" + arm.replace(" ", "_").replace("+", ""),
                               "model"), None) for arm in ARMS]:
        if path is None:
            arm_caches, mix = ARMS[name]
            run_dir = os.path.dirname(model_dir)
            cfg = TrainConfig(
                cache=[os.path.dirname(caches["train", c]) for c in arm_caches],
                student=student, output=run_dir, loss=LossConfig(loss="atkd", mix=mix),
                loader=LoaderConfig(batch_tokens=batch_tokens, num_workers=0), lr=lr,
                warmup_steps=5, max_steps=steps, precision="fp32", device="cpu",
                progress=False, tensorboard=False, checkpoint_every=20,
                resume=resumable(run_dir))
            if len(cfg.cache) == 1:
                cfg.cache = cfg.cache[0]
            stage(os.path.join(run_dir, "summary.json"), f"train {name}",
                  lambda cfg=cfg: train(cfg, log=lambda m: None))
            path = os.path.join(run_dir, "eval.json")

        def evaluate(model_dir=model_dir, path=path):
            model = load_causal_lm(model_dir, dtype="fp32").eval()
            with open(path, "w") as f:
                json.dump(cache_metrics(model, held), f)

        stage(path, f"evaluate {name}", evaluate)
        with open(path) as f:
            metrics = json.load(f)
        rows[name] = row_of(metrics)
    teachers = metrics["per_teacher"]
    results = {
        "train": n_train, "held_out": held_out, "steps": steps, "batch_tokens": batch_tokens,
        "lr": lr, "held_out_tokens": metrics["tokens"], "rows": rows,
        "train_tokens": _confident_share(caches)[1],
        "confident_share_A": _confident_share(caches)[0],
        "teachers": {
            "A": {"nll": teachers[0]["teacher_nll"],
                  "agree_other": _agreement(held)},
            "B": {"nll": teachers[1]["teacher_nll"], "agree_other": _agreement(held)},
        },
    }
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(report(results))


def _confident_share(caches: dict) -> tuple[float, int]:
    """(share of the training positions where teacher A gives the target at least B's
    probability, i.e. where `confident` picks A; the number of positions)."""
    from atkd_cache.cache.reader import open_cache

    lp = [open_cache(os.path.dirname(caches["train", t])).column("target_logprob")
          for t in ("A", "B")]
    return float((lp[0] >= lp[1]).mean()), len(lp[0])


def _agreement(held: list[str]) -> float:
    """How often the two teachers' top-1 ids agree on the held-out positions."""
    from atkd_cache.cache.reader import open_cache

    a, b = open_cache(held[0]), open_cache(held[1])
    same = total = 0
    for sa, sb in zip(a, b, strict=True):
        same += int((sa.topk_ids[:, 0] == sb.topk_ids[:, 0]).sum())
        total += len(sa.topk_ids)
    return same / max(total, 1)


if __name__ == "__main__":
    main()
