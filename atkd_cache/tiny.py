"""Tiny, offline stand-ins for real assets: a BPE tokenizer trained on the fly, a random-init
Llama or GPT-2, and a small synthetic corpus. Used by the tests; they are saved to folders
and loaded back through the same `from_pretrained` path as real models."""

from __future__ import annotations

import json
import os
import random

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# Another family's chat format (Llama 3's markers and layout), for students that render chats
# with their own template; `trim` as Llama 3's own template has it
LLAMA3_MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_WORDS = (
    "the cat dog sat on a mat and ran to house tree river small big red blue green quick slow "
    "bird sings song morning night sun moon star light dark cold warm rain snow wind boat sea "
    "what where why how is are was were it he she they we you i said asked answered because"
).split()


def synthetic_sentences(n: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English sentences of 4-24 words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 24))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    return out


def build_tokenizer(folder: str, vocab_size: int = 300, seed: int = 0,
                    texts: list[str] | None = None, chat_template: str = CHAT_TEMPLATE,
                    markers: list[str] | None = None) -> str:
    """Train a byte-level BPE tokenizer with a chat template (its `markers` as added tokens:
    ChatML's by default) on `texts` (default: synthetic sentences); save it to `folder`."""
    markers = markers or SPECIAL[3:]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL[:3] + markers,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts if texts is not None else synthetic_sentences(2000, seed),
                            trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=markers,
    )
    fast.chat_template = chat_template
    os.makedirs(folder, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def build_model(
    folder: str,
    vocab_size: int,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> str:
    """Save a random-init causal LM (Llama or GPT-2) with `vocab_size` logits to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
            bos_token_id=1, eos_token_id=2,
        )
    else:
        raise ValueError(f"unknown arch {arch}")
    model = AutoModelForCausalLM.from_config(config)
    # Random init gives near-uniform predictions; scale the output layer so the teacher has
    # peaked, varied distributions like a trained model (more useful for tests).
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    model.save_pretrained(folder)
    return folder


def write_datasets(folder: str, n: int = 64, seed: int = 0) -> dict[str, str]:
    """Write text, prompt/response and chat jsonl files; return their paths by shape."""
    os.makedirs(folder, exist_ok=True)
    sents = synthetic_sentences(3 * n, seed)
    paths = {}
    rows = {
        "text": [{"text": s} for s in sents[:n]],
        "prompt_response": [
            {"prompt": sents[i], "response": sents[n + i]} for i in range(n)
        ],
        "chat": [
            {
                "messages": [
                    {"role": "user", "content": sents[i]},
                    {"role": "assistant", "content": sents[n + i]},
                    {"role": "user", "content": sents[2 * n + i]},
                    {"role": "assistant", "content": sents[(i + 1) % n]},
                ]
            }
            for i in range(n)
        ],
    }
    for shape, items in rows.items():
        path = os.path.join(folder, f"{shape}.jsonl")
        with open(path, "w") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
        paths[shape] = path
    return paths
