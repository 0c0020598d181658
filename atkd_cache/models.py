"""Loading Hugging Face causal LMs and tokenizers from a folder, a hub id, or a .gguf file."""

from __future__ import annotations

import os

import torch

from atkd_cache.errors import UserError, first_line

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' is bf16 on a CUDA device that supports it and fp32 otherwise: on CPUs without
    AVX512-BF16 (e.g. AVX2-only machines) bf16 matmuls run ~100x slower than fp32."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_device(device: str) -> str:
    """'auto' is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def split_gguf(path: str) -> tuple[str, str | None]:
    """('folder', 'file.gguf') for a .gguf path, else (path, None)."""
    if path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    return path, None


def _check_exists(path: str, what: str) -> None:
    local_looking = path.startswith((".", "/", "~")) or path.endswith(".gguf")
    if local_looking and not os.path.exists(path):
        raise UserError(f"{what} {path} does not exist: give a model folder, .gguf file or hub id")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """AutoTokenizer from a folder, hub id or .gguf file."""
    from transformers import AutoTokenizer

    _check_exists(path, "tokenizer path")
    folder, gguf = split_gguf(path)
    try:
        return AutoTokenizer.from_pretrained(
            folder, gguf_file=gguf, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # transformers raises OSError/ValueError/ImportError variously
        raise UserError(f"cannot load a tokenizer from {path}: {first_line(e)}") from None


def load_causal_lm(
    path: str,
    dtype: str = "auto",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """AutoModelForCausalLM in eval mode on `device`, weights in `dtype` (auto/bf16/fp16/fp32)."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(dtype, device)
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _check_exists(path, "model path")
    folder, gguf = split_gguf(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=gguf,
            dtype=DTYPES[dtype],
            revision=revision,
            trust_remote_code=trust_remote_code,
        )
    except Exception as e:
        raise UserError(f"cannot load a causal LM from {path}: {first_line(e)}") from None
    if gguf is not None:
        model = _without_gguf(model, trust_remote_code)
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"cannot use device {device!r}: {first_line(e)}") from None
    return model.eval()


def _without_gguf(model, trust_remote_code: bool):
    """A model loaded from GGUF is already de-quantized but keeps a quantization config that
    `save_pretrained` refuses; copy its weights into a plain model of the same architecture
    so that a GGUF student (or a student built from a GGUF teacher) can be saved."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(model.parameters()).dtype
    plain = AutoModelForCausalLM.from_config(
        config, dtype=dtype, trust_remote_code=trust_remote_code
    )
    plain.load_state_dict(model.state_dict())
    return plain


def logits_width(model) -> int:
    """Number of logits the model produces per position (may exceed the tokenizer's vocab)."""
    return int(model.get_output_embeddings().weight.shape[0])


def eos_token_ids(path: str, tokenizer, revision: str | None = None) -> tuple[int, ...]:
    """The ids that end a reply: the tokenizer's EOS and the model's generation-config EOS
    ids (chat models often end turns with a token other than the tokenizer's EOS)."""
    from transformers import GenerationConfig

    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    folder, gguf = split_gguf(path)
    if gguf is None:
        try:
            eos = GenerationConfig.from_pretrained(folder, revision=revision).eos_token_id
        except Exception:  # no generation_config.json: the tokenizer's EOS is all there is
            eos = None
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return tuple(sorted(ids))
