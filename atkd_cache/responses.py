"""Export the teacher-written responses of a generated cache (`dump-teacher --generate`) as
JSON Lines, for sequence-level KD (SFT on the teacher's replies) in any tool.

One line per cached sequence, in cache order:
    seq_id, prompt_index (= seq_id // num_responses), response_index (= seq_id % num_responses)
    prompt        the prompt as rendered (chat template markup included), decoded
    completion    the reply decoded, without its final EOS (TRL's prompt/completion columns)
    prompt_ids, completion_ids   the exact token ids (the completion's EOS included), so a
                  tool that takes ids never re-tokenizes the text (axolotl #2692)
    truncated     true when the reply has no EOS within the card's max_new_tokens
    tokenizer_fingerprint   the cache's tokenizer fingerprint: `dump-teacher --token-ids`
                  scores these ids only with a tokenizer of the same fingerprint
Within atkd-cache itself, `train-student --loss ce --cache GENERATED` is the same SFT on the
exact tokens with no export at all.
"""

from __future__ import annotations

import json
import os

from tqdm.auto import tqdm

from atkd_cache.cache.reader import open_cache
from atkd_cache.errors import UserError
from atkd_cache.models import load_tokenizer
from atkd_cache.paths import check_output_file


def response_rows(cache, tokenizer=None):
    """Yield one dict per sequence of a generated cache (the module docstring's fields; the
    text fields only when a tokenizer is given)."""
    gen = cache.card.generation
    n, eos = int(gen["num_responses"]), set(gen["eos_token_ids"])
    for seq in cache:
        start = int(seq.supervised.argmax()) + 1  # the reply's first token
        prompt, reply = seq.input_ids[:start].tolist(), seq.input_ids[start:].tolist()
        truncated = reply[-1] not in eos
        row = {"seq_id": seq.seq_id, "prompt_index": seq.seq_id // n,
               "response_index": seq.seq_id % n}
        if tokenizer is not None:
            text = reply if truncated else reply[:-1]
            row["prompt"] = tokenizer.decode(prompt, skip_special_tokens=False)
            row["completion"] = tokenizer.decode(text, skip_special_tokens=False)
        row.update(prompt_ids=prompt, completion_ids=reply, truncated=truncated,
                   tokenizer_fingerprint=cache.card.tokenizer_fingerprint)
        yield row


def export_responses(
    cache_path: str, output: str, tokenizer: str | None = None, progress: bool = True
) -> dict:
    """Write the responses of a generated cache to `output` (.jsonl); returns counts."""
    cache = open_cache(cache_path)
    if not cache.card.generated:
        raise UserError(f"{cache_path} holds given sequences, not teacher-written ones: "
                        f"--format responses needs a cache made by dump-teacher --generate")
    check_output_file(output, "the responses file")
    tok = load_tokenizer(tokenizer or cache.card.teacher_id)
    tmp = f"{output}.tmp.{os.getpid()}"  # renamed when whole: no half-written file
    rows = truncated = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in tqdm(response_rows(cache, tok), total=len(cache), disable=not progress,
                            desc="responses", unit="seq"):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows += 1
                truncated += row["truncated"]
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"rows": rows, "truncated": truncated,
            "num_responses": cache.card.generation["num_responses"]}
