"""Teacher-written responses, captured while they are generated (HF transformers backend).

`dump-teacher --generate` samples `num_responses` replies per prompt from the teacher and
stores prompt + reply as one sequence whose supervised positions are the reply's tokens
(EOS included). The per-position arrays are the same as a teacher-forced pass would give,
computed during generation from the *raw* logits of every step:

    step j of a reply sees raw logits z_j (nothing applied: no temperature, top-p, penalty);
    the cached quantities are position_stats(z_j, chosen token)   (teacher/extract.py)
    the chosen token is drawn from softmax(z_j / gen_temperature) restricted to its top-p
    nucleus (inverse CDF at a uniform u_j), or argmax z_j with greedy.

`transformers.generate` runs the decoding (KV cache, left padding, stopping); our
`CaptureSampler` is its only logits processor (the teacher's own generation config is set
aside, so no penalty or warper from its hub config touches the logits before us). It picks
the token itself and hands `generate` a one-hot score row, so generate's greedy step
follows it. Every reply draws its uniforms from a generator of its own, seeded by
(seed, seq_id), so a reply does not depend on what else is in its batch, on ranks, or on
resume; sampled mode's draws use the same per-sequence uniforms as the scoring pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

from atkd_cache.data import TokenizedSequence
from atkd_cache.teacher.extract import position_stats
from atkd_cache.teacher.hf import left_pad, split_samples, uniforms_seed


@dataclass
class GenerationSpec:
    """How the teacher writes its responses (recorded whole in the cache card)."""

    num_responses: int = 1
    temperature: float = 1.0  # sampling temperature; the stored distribution stays at T = 1
    top_p: float = 1.0
    max_new_tokens: int = 256
    greedy: bool = False
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()  # none: every reply runs to max_new_tokens

    def card(self) -> dict:
        """The card's `generation` entry."""
        out = asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        if self.greedy:  # sampling settings do not apply
            out["temperature"], out["top_p"] = 0.0, 1.0
        return out


@dataclass
class Prompt:
    """One reply to write: the sequence id it will carry and the prompt's token ids."""

    seq_id: int  # prompt row * num_responses + response index
    input_ids: np.ndarray  # [p] int64


def reply_sequence(prompt: Prompt, reply) -> TokenizedSequence:
    """Prompt + reply as one sequence whose supervised positions are the reply's tokens
    (from the prompt's last position on)."""
    input_ids = np.concatenate([prompt.input_ids, np.asarray(reply, dtype=np.int64)])
    supervised = np.zeros(len(input_ids) - 1, dtype=bool)
    supervised[len(prompt.input_ids) - 1:] = True
    return TokenizedSequence(prompt.seq_id, input_ids, supervised)


def reply_seed(seed: int, seq_id: int) -> int:
    """The seed of one reply's token choices (63 bits; vLLM takes it modulo 2**31)."""
    digest = hashlib.sha256(f"atkd-generate:{seed}:{seq_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def vllm_sampling(spec: GenerationSpec, seq_id: int, top_k: int) -> dict:
    """One reply's vLLM sampling fields, the same for the offline engine (SamplingParams) and
    a server (/v1/completions takes the same names), so both write the same replies: its own
    seed (reply_seed, modulo the 2**31 vLLM takes), the top-k sample log-probs, greedy as
    temperature 0, and the EOS ids as stop ids (none: replies run to max_new_tokens, as on
    the HF backend)."""
    return {"max_tokens": spec.max_new_tokens, "logprobs": top_k,
            "stop_token_ids": list(spec.eos_token_ids), "ignore_eos": not spec.eos_token_ids,
            "temperature": 0.0 if spec.greedy else spec.temperature,
            "top_p": 1.0 if spec.greedy else spec.top_p,
            "seed": reply_seed(spec.seed, seq_id) % (2**31)}


def nucleus_choice(z: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float):
    """Token ids drawn from softmax(z / temperature) cut to its top-p nucleus (the smallest
    set of most probable tokens holding >= top_p of the mass): the first id, in vocabulary
    order, whose cumulative kept mass exceeds u * (kept mass), for u [B] uniform in [0, 1)."""
    probs = torch.softmax(z.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # mass ahead already >= top_p
        probs = probs.scatter(1, order, sorted_p.masked_fill(outside, 0.0))
    cdf = probs.cumsum(-1)
    point = (u.double() * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, point, right=True).clamp_(max=z.shape[1] - 1)[:, 0]


class CaptureSampler:
    """A logits processor for `generate` that picks each row's next token and records the
    teacher's quantities at that position from the raw logits it is handed."""

    def __init__(self, prompts: list[Prompt], spec: GenerationSpec, k: int,
                 num_samples: int = 0, sample_seed: int = 0):
        self.spec, self.k, self.num_samples = spec, k, num_samples
        self.choice_gens = [torch.Generator().manual_seed(reply_seed(spec.seed, p.seq_id))
                            for p in prompts]
        self.draw_gens = [torch.Generator().manual_seed(uniforms_seed(sample_seed, p.seq_id))
                          for p in prompts] if num_samples else []
        self.eos = torch.tensor(sorted(spec.eos_token_ids), dtype=torch.long)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.stats: list[list[dict]] = [[] for _ in prompts]
        self.done = torch.zeros(len(prompts), dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = len(self.tokens)
        # One uniform per row per step, finished rows included: a row's j-th uniform is its
        # j-th draw whatever the batch.
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.choice_gens])
        if self.spec.greedy:
            chosen = scores.argmax(dim=-1).cpu()
        else:
            chosen = nucleus_choice(scores, u.to(scores.device), self.spec.temperature,
                                    self.spec.top_p).cpu()
        live = torch.nonzero(~self.done).squeeze(1)
        if len(live):
            uniforms = None
            if self.num_samples:
                uniforms = torch.cat([
                    torch.rand(1, self.num_samples, generator=self.draw_gens[i],
                               dtype=torch.float64) for i in live.tolist()
                ]).to(scores.device)
            stats = position_stats(scores, chosen[live].to(scores.device), self.k,
                                   rows=live.to(scores.device), uniforms=uniforms)
            host = {n: t.cpu().numpy() for n, t in vars(stats).items() if t is not None}
            for j, i in enumerate(live.tolist()):
                self.tokens[i].append(int(chosen[i]))
                self.stats[i].append({n: a[j] for n, a in host.items()})
        self.done |= torch.isin(chosen, self.eos)
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(rows), chosen.to(scores.device)] = 0.0
        return forced


def stack_stats(steps: list[dict], k: int, num_samples: int) -> dict[str, np.ndarray]:
    """One reply's per-step records -> the per-position arrays of the cache."""
    out = {name: np.stack([s[name] for s in steps]) for name in steps[0]}
    draws = out.pop("draws", None)
    if k == 0:
        out.pop("topk_ids"), out.pop("topk_logprobs")
    if num_samples:
        out.update(split_samples(draws))
    return out


@torch.inference_mode()
def generate_outputs(
    model, prompts: list[Prompt], spec: GenerationSpec, k: int, pad_id: int = 0,
    num_samples: int = 0, sample_seed: int = 0,
) -> list[tuple[TokenizedSequence, dict[str, np.ndarray]]]:
    """Generate one reply per prompt (a left-padded batch) and return, per prompt, the
    finished sequence (prompt + reply, reply positions supervised) and its teacher arrays."""
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    ids, mask = left_pad([p.input_ids for p in prompts], pad_id)
    width = ids.shape[1]
    sampler = CaptureSampler(prompts, spec, k, num_samples, sample_seed)
    # A neutral config in place of the teacher's own, so that `generate` fills nothing in
    # from it (a hub config's repetition penalty would change the logits we are handed).
    own = model.generation_config
    model.generation_config = GenerationConfig(
        eos_token_id=list(spec.eos_token_ids) or None, pad_token_id=pad_id,
        bos_token_id=own.bos_token_id,
    )
    try:
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
            num_beams=1, max_new_tokens=spec.max_new_tokens, pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([sampler]),
        )
    finally:
        model.generation_config = own
    results = []
    for b, p in enumerate(prompts):
        reply = sampler.tokens[b]
        emitted = out[b, width: width + len(reply)].cpu().tolist()
        if emitted != reply:  # generate must have followed our choices exactly
            raise RuntimeError("generate did not follow the capture sampler's tokens")
        results.append((reply_sequence(p, reply), stack_stats(sampler.stats[b], k, num_samples)))
    return results
