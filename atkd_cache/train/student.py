"""Students: compatibility with a cache, layer-subset initialisation, and logits at the
supervised rows only (the LM head never runs on prompt or padding positions)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch
from torch import nn

from atkd_cache.cache.schema import CacheCard
from atkd_cache.errors import UserError
from atkd_cache.fingerprint import tokenizer_fingerprint
from atkd_cache.losses.crosstok import ChunkTeacher, crosstok_loss
from atkd_cache.losses.fused import fused_crosstok_loss, fused_kd_loss, head_logits
from atkd_cache.losses.kd import LossConfig, LossOutput, SparseTeacher, kd_loss
from atkd_cache.models import load_causal_lm, load_tokenizer
from atkd_cache.paths import check_output_folder


def check_compatible(card: CacheCard, tokenizer, width: int | None, student: str) -> None:
    """The student must tokenize exactly as the teacher did and have a logit for every id the
    tokenizer can produce (a padded, larger logits width is fine; width None: the tokenizer
    only, checked before the model loads)."""
    mine = tokenizer_fingerprint(tokenizer)
    if mine != card.tokenizer_fingerprint:
        raise UserError(
            f"tokenizer mismatch: student {student} has {mine[:19]}…, the cache's teacher "
            f"{card.teacher_id} has {card.tokenizer_fingerprint[:19]}…: train it with "
            "--cross-tokenizer alm|uld|gold (docs/losses.md section 9), or pass the "
            "teacher's --tokenizer, or pick a student of the same family"
        )
    if width is not None and width < card.tokenizer_vocab_size:
        raise UserError(
            f"vocabulary mismatch: student {student} has {width} logits, the cache's teacher "
            f"{card.teacher_id} has a vocabulary of {card.tokenizer_vocab_size} ids: the "
            "student's output layer must cover every id"
        )


def check_ids(max_id: int, width: int, student: str) -> None:
    """Refuse a batch holding a cached token id the student has no logit for."""
    if max_id >= width:
        raise UserError(
            f"the cache holds token id {max_id} but student {student} has only {width} "
            "logits: use a student whose output layer covers the teacher's logits"
        )


def _decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the transformer blocks."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name:
            return name, module
    raise UserError(f"cannot find the {count} transformer layers of {type(model).__name__}")


def parse_layers(spec: str, total: int) -> list[int]:
    """'0,3,7' (explicit, 0-based) or '6' (six layers evenly spaced, first and last kept)."""
    try:
        if "," in spec:
            layers = [int(x) for x in spec.split(",") if x.strip()]
        else:
            n = int(spec)
            if not 1 <= n <= total:
                raise UserError(f"--layers {n}: the teacher has {total} layers; pick 1..{total}")
            layers = sorted({int(round(x)) for x in np.linspace(0, total - 1, n)})
    except ValueError:
        raise UserError(f"--layers must be a count or a comma list of indices, got {spec!r}") \
            from None
    bad = [i for i in layers if not 0 <= i < total]
    if bad or len(set(layers)) != len(layers) or layers != sorted(layers):
        raise UserError(
            f"--layers {spec}: indices must be distinct, increasing and in 0..{total - 1}"
        )
    return layers


def moved_embeddings(embeddings: torch.Tensor, old_tokenizer, new_tokenizer) -> torch.Tensor:
    """Input embeddings for another tokenizer's vocabulary [V_new, H]: each new token gets the
    mean of the old embeddings of its bytes' old tokens (the old tokenization of its text, or
    its bytes one by one where the text is not whole UTF-8 characters); an added token the
    old tokenizer also has (a chat marker) keeps its old embedding. Both byte-level."""
    from atkd_cache.cache.text import token_bytes

    old_table = token_bytes(old_tokenizer)
    single = {b: i for i, b in enumerate(old_table) if b is not None and len(b) == 1}
    old_ids = {b: i for i, b in enumerate(old_table) if b is not None}
    added = old_tokenizer.get_added_vocab()
    out = embeddings.new_zeros(len(new_tokenizer), embeddings.shape[1])
    for i, b in enumerate(token_bytes(new_tokenizer)):
        if b is None:
            continue
        if b in old_ids and (b.decode("utf-8", "ignore") in added or len(b) == 1):
            ids = [old_ids[b]]
        else:
            try:
                ids = old_tokenizer(b.decode("utf-8"), add_special_tokens=False)["input_ids"]
            except UnicodeDecodeError:  # a token ending inside a character
                ids = [single[x] for x in b if bytes([x]) in single]
        if ids:
            out[i] = embeddings[ids].mean(0)
    return out


def init_student(
    teacher: str, layers: str, output: str, trust_remote_code: bool = False,
    tokenizer: str | None = None,
) -> list[int]:
    """Save a student that keeps a subset of the teacher's layers (DistilBERT-style init):
    same embeddings, final norm and LM head, the chosen blocks renumbered. With `tokenizer`
    (another byte-level tokenizer) the embeddings (and a tied LM head) move to its vocabulary
    (`moved_embeddings`) and it becomes the student's. Returns the kept layer indices. Written
    to a temp folder and renamed, so `output` is all or nothing."""
    from transformers import AutoModelForCausalLM

    if os.path.exists(output):
        raise UserError(f"{output} already exists: choose a new --output folder")
    check_output_folder(output, "the student at")
    model = load_causal_lm(teacher, dtype="fp32", trust_remote_code=trust_remote_code)
    prefix, blocks = _decoder_layers(model)
    keep = parse_layers(layers, len(blocks))
    config = model.config
    config.num_hidden_layers = len(keep)
    for attr in ("layer_types",):  # per-layer settings (e.g. sliding vs full attention)
        if isinstance(getattr(config, attr, None), list):
            setattr(config, attr, [getattr(config, attr)[i] for i in keep])
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(index) not in renumber:
                continue
            key = f"{prefix}.{renumber[int(index)]}.{rest}"
        state[key] = value
    student = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k} if student.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise UserError(f"cannot map teacher weights onto the student: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    if tokenizer is not None:
        from atkd_cache.cache.text import is_byte_level

        new_tok = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        old_tok = load_tokenizer(teacher, trust_remote_code=trust_remote_code)
        if not (is_byte_level(new_tok) and is_byte_level(old_tok)):
            raise UserError("--tokenizer: moving embeddings needs byte-level tokenizers on "
                            "both sides")
        tied = student.config.tie_word_embeddings
        with torch.no_grad():  # an untied LM head's rows move the same way
            moved = [moved_embeddings(m.weight, old_tok, new_tok) for m in (
                student.get_input_embeddings(), *(() if tied else (
                    student.get_output_embeddings(),)))]
            student.resize_token_embeddings(len(new_tok))
            student.get_input_embeddings().weight.copy_(moved[0])
            if not tied:
                student.get_output_embeddings().weight.copy_(moved[1])
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the new ids
            token = getattr(new_tok, name.removesuffix("_id"), None)
            setattr(student.config, name, new_tok.convert_tokens_to_ids(token) if token
                    else None)
            if getattr(student, "generation_config", None) is not None:
                setattr(student.generation_config, name, getattr(student.config, name))
        tokenizer = new_tok
    else:
        tokenizer = load_tokenizer(teacher, trust_remote_code=trust_remote_code)
    tmp = output.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, output)
    return keep


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (the method was renamed
    in transformers 5.2x; older versions only have the gradient_* name)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class RowLogits(nn.Module):
    """Wraps a causal LM so that forward returns logits [N, V] only at flat row indices into
    the [B * T] positions. DDP wraps this module, so gradient sync sees the whole forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        rows: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        teacher=None,
        loss_cfg=None,
        group_offsets: torch.Tensor | None = None,
    ):
        """Logits at `rows`; or, given the teacher rows and a LossConfig, the loss of the LM
        head fused with it (losses/fused.py: no [N, V] logits), as {"loss", "parts"}. The
        loss is computed here, inside the module DDP and FSDP wrap, so that they see the
        head's weight used. Packed batches pass position_ids and no attention mask:
        transformers then builds block-diagonal causal attention from the position resets."""
        hidden = self.model.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        picked = hidden.flatten(0, 1).index_select(0, rows)
        head = self.model.get_output_embeddings()
        if teacher is not None:
            out = loss_at_rows(picked, head, teacher, loss_cfg, group_offsets, self.softcap)
            return {"loss": out.loss, "parts": out.parts}
        return head_logits(picked, head.weight, head.bias, self.softcap)


def loss_at_rows(
    hidden: torch.Tensor,
    head: nn.Module,
    teacher: SparseTeacher | ChunkTeacher,
    loss_cfg: LossConfig,
    group_offsets: torch.Tensor | None = None,
    softcap: float | None = None,
    fused: bool = True,
) -> LossOutput:
    """The loss of the student's final hidden states [N, H] at the supervised rows, through
    its LM head: KD over the cache's rows (a SparseTeacher), or for a student of another
    tokenizer the chunk losses (a ChunkTeacher). Fused with the loss (losses/fused.py, no
    [N, V] logits) when the head is a plain linear layer, else (a PEFT-wrapped head,
    `fused=False`) logits then the loss."""
    cross = isinstance(teacher, ChunkTeacher)
    if fused and isinstance(head, nn.Linear):
        if cross:
            return fused_crosstok_loss(hidden, head.weight, teacher, loss_cfg, bias=head.bias,
                                       softcap=softcap)
        return fused_kd_loss(hidden, head.weight, teacher, loss_cfg, bias=head.bias,
                             group_offsets=group_offsets, softcap=softcap)
    logits = head_module_logits(hidden, head, softcap)
    if cross:
        return crosstok_loss(logits, teacher, loss_cfg)
    return kd_loss(logits, teacher, loss_cfg, group_offsets=group_offsets)


def head_module_logits(hidden: torch.Tensor, head: nn.Module, softcap: float | None = None
                       ) -> torch.Tensor:
    """The LM head module's logits [N, V] of final hidden states [N, H], soft-capped as the
    model caps them (a PEFT-wrapped head runs as itself: losses/fused.py's head_logits
    takes a plain linear layer's weight)."""
    logits = head(hidden)
    return torch.tanh(logits / softcap) * softcap if softcap else logits
