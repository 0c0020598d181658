"""The study's registered design (docs/study.md): its sizes, arms and presets, as plain data.

Kept apart from atkd_cache/study.py (the stages) so that the command line can build its
flags from StudyConfig without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

# The paper's ATKD (alpha 0.2, no CE, the cache's per-sequence median split) and its
# baselines; the first design's ablations stay available behind --arms.
ATKD = {"loss": "atkd", "base": "fkl", "alpha": 0.2, "split": "cache"}
ARMS: dict[str, dict] = {
    "sft": {"loss": "ce"},
    "kd": {"loss": "kd", "base": "fkl"},
    "atkd": ATKD,
    "atkd+ce": {**ATKD, "ce_weight": 1.0},
    "rkl": {"loss": "kd", "base": "rkl"},
    "atkd-rkl": {**ATKD, "base": "rkl"},
    "atkd-alpha0.5": {**ATKD, "alpha": 0.5},
    "atkd-hard0.3": {**ATKD, "split": "sequence", "hard_ratio": 0.3},
    "atkd-hard0.7": {**ATKD, "split": "sequence", "hard_ratio": 0.7},
    "atkd-split-batch": {**ATKD, "split": "batch", "hard_ratio": 0.5},
}
SETTINGS = ("teacher", "human")  # who wrote the training responses
EXAMPLES = 3  # replies kept per run for the report's example (the first test prompts)


@dataclass
class StudyConfig:
    """Sizes of the study; the defaults are the registered design (docs/study.md)."""

    workdir: str = "runs/study"
    results: str = ""  # the results file; "" = <workdir>/results.json
    layers: str = "6"
    heal_chats: int = 1200
    heal_verses: int = 4  # consecutive verses per healing chat: user, assistant, user, ...
    heal_lr: float = 1e-3
    heal_batch_tokens: int = 2048
    max_messages: int = 4
    prompt_tokens: int = 112  # longer prompts are left out
    max_new_tokens: int = 48
    train_prompts: int = 500
    responses: int = 2  # teacher replies per training prompt
    temperature: float = 0.7  # the teacher's sampling temperature for training replies
    human_chats: int = 1000  # the second setting's training conversations
    val_prompts: int = 100
    test_prompts: int = 300
    top_k: int = 32
    epochs: int = 1
    batch_tokens: int = 1024
    lrs: list[float] = field(default_factory=lambda: [5e-5, 1.5e-4, 4.5e-4])
    grid_extend: int = 2  # times the grid may grow past an edge that won (for every arm)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    human_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: ["sft", "kd", "atkd"])
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    # registered before the run (docs/study.md); the report words its verdict to them
    smallest_effect: float = 0.01
    headroom_kl: float = 0.2


# The README's main command: the same design, small enough for ~15 minutes.
# Its runs are ~20 steps (a fifth of the study's), so its two rates sit at and above the
# study's choices (4.5e-4 for SFT and KD, 1.5e-4 for ATKD); no grid extension, for time.
DEMO = {"layers": "4", "heal_chats": 300, "train_prompts": 96, "human_chats": 0,
        "val_prompts": 24, "test_prompts": 60, "max_new_tokens": 32, "lrs": [4.5e-4, 1.35e-3],
        "grid_extend": 0, "seeds": [0], "human_seeds": [], "settings": ["teacher"]}
SMOKE = {"layers": "2", "heal_chats": 24, "train_prompts": 12, "responses": 1,
         "human_chats": 12, "val_prompts": 4, "test_prompts": 6, "prompt_tokens": 64,
         "max_new_tokens": 8, "batch_tokens": 512, "heal_batch_tokens": 512, "lrs": [3e-4],
         "seeds": [0, 1], "human_seeds": [0], "top_k": 8, "arms": ["kd", "atkd"],
         "grid_extend": 0}


PRESETS = {"demo": {**DEMO, "workdir": "runs/demo"}, "smoke": SMOKE}


# ------------------------------------------ on-policy rounds vs off-policy KD (issue 31)

# The registered comparison of docs/on-policy.md. Every arm is KD's recipe (forward KL over
# the teacher's top-k) except onpolicy-rkl; what differs is who wrote the replies.
ON_POLICY_ARMS: dict[str, dict] = {
    "offpolicy-kd": {"loss": "kd", "base": "fkl"},  # the teacher's sampled replies (the study's KD)
    "onpolicy-kd": {"loss": "kd", "base": "fkl"},  # rounds of the student's own replies
    "onpolicy-rkl": {"loss": "rkl-tokens", "discount": 1.0},
    "offpolicy-then-onpolicy": {"loss": "kd", "base": "fkl"},  # half each, Qwen3's order
}


@dataclass
class OnPolicyStudyConfig(StudyConfig):
    """The comparison's sizes: the study's setup (same data, teacher, healed student, test
    prompts) with on-policy rounds; the defaults are the registration (docs/on-policy.md).
    Every arm sees train_prompts x responses replies once: rounds x prompts_per_round x
    rollouts must equal it (checked)."""

    workdir: str = "runs/on-policy-study"
    rounds: int = 4
    prompts_per_round: int = 125
    rollouts: int = 2  # student replies per prompt and round
    rollout_temperature: float = 1.0  # the student samples from itself (behaviour = policy)
    lrs: list[float] = field(default_factory=lambda: [1.5e-4, 4.5e-4, 1.35e-3])
    grid_extend: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    human_seeds: list[int] = field(default_factory=list)
    arms: list[str] = field(default_factory=lambda: list(ON_POLICY_ARMS))
    settings: list[str] = field(default_factory=lambda: ["teacher"])
    baseline: str = "offpolicy-kd"
    challenger: str = "onpolicy-kd"


# (the smoke leaves out onpolicy-rkl for time: its loss is tested exactly in
# tests/test_onpolicy.py, and the loop passes any LossConfig through)
ON_POLICY_SMOKE = {**SMOKE, "rounds": 2, "prompts_per_round": 6, "rollouts": 1,
                   "seeds": [0], "human_seeds": [], "settings": ["teacher"],
                   "arms": ["offpolicy-kd", "onpolicy-kd", "offpolicy-then-onpolicy"]}


def sized(cls, smoke_sizes: dict, smoke: bool, values: dict):
    """A recipe's registered design (`cls`), or its smoke size in <workdir>-quick, with
    `values` (flags the user gave; None = not given) on top."""
    merged = {**smoke_sizes, "workdir": cls.workdir + "-quick"} if smoke else {}
    merged.update({k: v for k, v in values.items() if v is not None})
    return cls(**merged)


def on_policy_study_config(smoke: bool = False, **values) -> OnPolicyStudyConfig:
    """The registered on-policy comparison, or its smoke size."""
    return sized(OnPolicyStudyConfig, ON_POLICY_SMOKE, smoke, values)


def study_config(preset: str | None = None, **values) -> StudyConfig:
    """The registered design, or a preset of it ("demo", "smoke", "demo+smoke"), with
    `values` (flags the user gave) on top. The smoke size works in <workdir>-quick so it
    never resumes the full-size results."""
    merged: dict = {}
    names = [n for n in (preset or "").split("+") if n]
    for name in names:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}")
        merged.update(PRESETS[name])
    if "smoke" in names:
        merged["workdir"] = merged.get("workdir", StudyConfig.workdir) + "-quick"
    merged.update({k: v for k, v in values.items() if v is not None})
    return StudyConfig(**merged)


# ------------------------------------------------ students of another tokenizer (issue 32)

CROSSTOK_ARMS = ("ce", "alm", "uld", "gold")  # --cross-tokenizer modes; ce is the baseline


@dataclass
class CrossTokStudyConfig(StudyConfig):
    """A student with another tokenizer, distilled from the study's teacher-written replies
    (docs/training.md, registered there): the study's data, teacher and test prompts; the
    student is the teacher's layer cut with its embeddings moved to a byte-level BPE of
    `student_vocab` ids trained on the training conversations, healed by CE on the KJV chats
    in its own tokenization; every arm the same steps and lr grid."""

    workdir: str = "runs/crosstok-study"
    student_vocab: int = 8192
    chunk_temperature: float = 1.0
    lrs: list[float] = field(default_factory=lambda: [1.5e-4, 4.5e-4, 1.35e-3])
    grid_extend: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    human_seeds: list[int] = field(default_factory=list)
    arms: list[str] = field(default_factory=lambda: list(CROSSTOK_ARMS))
    settings: list[str] = field(default_factory=lambda: ["teacher"])
    baseline: str = "ce"
    challenger: str = "alm"
    smallest_effect: float = 0.01  # ROUGE-L, as the study
    headroom_bpb: float = 0.05  # CE must cut the test replies' bits/byte by this much


# (the smoke runs the primary pair: uld and gold train in tests/test_crosstok_train.py)
CROSSTOK_SMOKE = {**SMOKE, "student_vocab": 600, "seeds": [0], "human_seeds": [],
                  "arms": ["ce", "alm"], "settings": ["teacher"]}


def crosstok_study_config(smoke: bool = False, **values) -> CrossTokStudyConfig:
    """The registered cross-tokenizer study, or its smoke size."""
    return sized(CrossTokStudyConfig, CROSSTOK_SMOKE, smoke, values)
