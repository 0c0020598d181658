"""`KDTrainer`: a `transformers.Trainer` whose loss is the KD loss over a cached teacher.

    trainer = KDTrainer(model=student, args=TrainingArguments(...), loss=LossConfig(),
                        train_dataset=cache_dataset("cache/"), data_collator=KDCollator())

`KDLossMixin` carries everything, so it also goes in front of another Trainer subclass (TRL's
`SFTTrainer`: `class KDSFTTrainer(KDLossMixin, SFTTrainer)`).

One micro-batch: the model's forward runs through whatever wraps it (DDP, accelerate, PEFT)
with `logits_to_keep=1`, a forward hook on its decoder keeps the final hidden states, and the
loss is computed at the supervised rows only, through the LM head fused with the loss
(losses/fused.py) — the [B, T, V] logits never exist. Micro-batch i of a step is weighted by
its share n_i / n of the step's supervised tokens on all ranks (`num_items_in_batch`, counted
from `rows`), exactly as `train-student` weights them, so the two give the same steps.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import Trainer

from atkd_cache.errors import UserError
from atkd_cache.hf.collator import TEACHER_COLUMNS
from atkd_cache.losses.kd import LossConfig, is_count
from atkd_cache.train.student import loss_at_rows
from atkd_cache.train.trainer import (
    chunk_teacher,
    destroy_process_group_at_exit,
    loss_weight,
    sparse_teacher,
)


def _unwrap(model):
    """The transformers model under DDP / accelerate / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def _final_hidden(decoder, out: list):
    """Append the decoder's last_hidden_state to `out` while the block runs."""
    def hook(module, args, output):
        out.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class KDLossMixin:
    """compute_loss = the KD loss (`loss`, a LossConfig) from the batch's teacher columns;
    keeps those columns from being dropped; weights micro-batches by supervised tokens.
    `fused_head=False` computes the [N, V] logits at the supervised rows instead (the fused
    path is taken only when the LM head is a plain nn.Linear, e.g. not LoRA-wrapped)."""

    loss_is_scaled_for_ga = True  # compute_loss weights by num_items_in_batch itself

    def __init__(self, *args, loss: LossConfig | None = None, fused_head: bool = True,
                 **kwargs):
        self.kd_loss_config = loss or LossConfig()
        self.kd_loss_config.check()
        self.fused_head = fused_head
        self.kd_parts: dict[str, float] = {}  # this step's loss parts, logged with "loss"
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if targs is not None and targs.accelerator_config.dispatch_batches is None:
            # Micro-batches differ in shape (rows, teacher rows): each rank reads its own
            # shards instead of rank 0 reading all and slicing batches along dim 0.
            targs.accelerator_config.dispatch_batches = False
        super().__init__(*args, **kwargs)
        # Trainer (accelerate) joins torchrun's process group but never leaves it; a gloo
        # group left to interpreter exit can abort a finished rank (train/trainer.py)
        destroy_process_group_at_exit()

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        columns = getattr(self.train_dataset, "column_names", None) or []
        more = [c for c in columns if c.startswith("teacher")]  # several teachers' columns
        self._signature_columns += [c for c in (*TEACHER_COLUMNS, *more)
                                    if c not in self._signature_columns]

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Supervised rows (chunks, for a student of another tokenizer) of the whole step,
        summed over ranks."""
        n = torch.tensor(sum(loss_weight(b) for b in batch_samples), device=device)
        if self.args.world_size > 1:
            n = self.accelerator.gather(n.reshape(1)).sum()
        return n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The batch's KD loss, scaled by its share of the step (see the module docstring)."""
        inner = _unwrap(model)
        hidden: list[torch.Tensor] = []
        forward = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids")
                   if k in inputs}
        with _final_hidden(inner.get_decoder(), hidden):
            outputs = model(**forward, use_cache=False, logits_to_keep=1)
        rows = inputs["rows"]
        picked = hidden[-1].flatten(0, 1).index_select(0, rows)
        softcap = getattr(inner.config, "final_logit_softcapping", None)
        cross = "chunk.teacher_ll" in inputs
        if cross != bool(self.kd_loss_config.cross_tokenizer):
            raise UserError("the batch and the loss disagree about the student's tokenizer: "
                            "give KDCollator(aligner=...) together with LossConfig("
                            "cross_tokenizer=...), or neither (docs/integrations.md)")
        teacher = (chunk_teacher(inputs, picked.device) if cross  # another tokenizer
                   else sparse_teacher(inputs, picked.device, self.kd_loss_config))
        out = loss_at_rows(picked, inner.get_output_embeddings(), teacher, self.kd_loss_config,
                           None if cross else inputs["group_offsets"], softcap,
                           self.fused_head)
        loss = out.loss
        if num_items_in_batch is not None and model.training:
            share = loss_weight(inputs) * self.args.world_size / float(num_items_in_batch)
            loss = loss * share
            for key, value in out.parts.items():
                weight = 1.0 if is_count(key) else share / self.args.world_size
                self.kd_parts[key] = self.kd_parts.get(key, 0.0) + float(value) * weight
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the loss parts (e.g. ATKD's tkd/dkd, ce) of the steps since the last log, summed
        over ranks and averaged over steps."""
        if "loss" in logs and self.kd_parts:
            keys = sorted(self.kd_parts)
            values = torch.tensor([self.kd_parts[k] for k in keys], device=self.args.device)
            if self.args.world_size > 1:
                values = self.accelerator.reduce(values, reduction="sum")
            steps = max(1, self.state.global_step - getattr(self, "_kd_logged_step", 0))
            for key, value in zip(keys, values.tolist(), strict=True):
                logs[f"kd/{key}"] = value / steps
            self.kd_parts, self._kd_logged_step = {}, self.state.global_step
        super().log(logs, start_time)


class KDTrainer(KDLossMixin, Trainer):
    """A transformers Trainer training on a cache's teacher (see KDLossMixin)."""
