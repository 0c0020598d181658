"""Served teacher: prompt log-probs from running vLLM OpenAI-compatible servers.

Per sequence one `POST /v1/completions` with the token ids as the prompt, `max_tokens=1` and
`prompt_logprobs=k`: the same numbers the offline vLLM backend reads (teacher/vllm.py), over
HTTP. The fleet behind the URLs is the distributed engine (its own tensor/data parallelism);
we are its client:
- requests are spread over the URLs, at most `concurrency` in flight per server;
- a connection error, a timeout, a 5xx or a 429 is retried on the next server after an
  exponential back-off with jitter; after `retries` failed tries of one sequence the pass
  stops with one line (the shards committed so far stay, and a re-run resumes after them);
- a sequence's arrays exist only once its whole answer is parsed, and dump.py writes whole
  shards, so a retried request is never counted twice.
Before any work `check` asks every server: its model (`/v1/models`) is the one named, its
`max_model_len` fits the longest sequence, its tokenizer agrees with ours on a probe
(`/tokenize`), and a probe with `prompt_logprobs=k` is accepted (`--max-logprobs`).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import numpy as np

from atkd_cache.data import TokenizedSequence
from atkd_cache.errors import UserError
from atkd_cache.teacher.vllm import position_arrays, ranked_entries

RETRY_STATUS = {429, 500, 502, 503, 504}
PROBE_TEXT = "The capital of France is Paris. 1 + 2 = 3; naïve café, 東京."


@dataclass
class ServerConfig:
    """Where the teacher is served and how hard to try."""

    urls: list[str]
    model: str  # the served model name (`--served-model-name`, or the path it was started on)
    top_k: int
    concurrency: int = 8  # requests in flight per server
    timeout: float = 300.0  # seconds per request
    retries: int = 8  # tries per sequence before the pass stops
    backoff: float = 0.5  # seconds, doubled per try (with jitter), at most 30


def served_width(model_or_tokenizer: str, tokenizer) -> int:
    """The served model's logits width, from its local config when there is one (padded
    vocabularies are wider than the tokenizer), else the tokenizer's size."""
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(model_or_tokenizer).get_text_config().vocab_size)
    except Exception:  # a tokenizer-only folder, or a served name that is not a local path
        return len(tokenizer)


class Retry(Exception):
    """A failure worth another try (on another server)."""


@dataclass
class Logprob:
    """One entry of vLLM's prompt log-probs as JSON gives it."""

    logprob: float
    rank: int


def parse_prompt_logprobs(body: dict, seq: TokenizedSequence, k: int) -> dict[str, np.ndarray]:
    """The cache arrays of one sequence's supervised positions from a completions response."""
    entries = body["choices"][0]["prompt_logprobs"]
    if entries is None or len(entries) != len(seq.input_ids):
        raise UserError(f"the server returned {0 if entries is None else len(entries)} prompt "
                        f"log-prob entries for a {len(seq.input_ids)}-token sequence")
    parsed = [{int(tid): Logprob(v["logprob"], v["rank"]) for tid, v in e.items()}
              for e in entries[1:]]  # entry 0 is empty: nothing predicts the first token
    targets = seq.input_ids[1:].astype(np.int64)
    target_lp, topk_ids, topk_lp = ranked_entries(parsed, targets, k)
    sup = seq.supervised
    return position_arrays(target_lp[sup], topk_ids[sup], topk_lp[sup])


class ServerTeacher:
    """A client of one or many vLLM servers (module docstring)."""

    def __init__(self, cfg: ServerConfig):
        try:
            import httpx
        except ImportError:
            raise UserError("--backend server needs httpx: pip install httpx") from None
        self.httpx = httpx
        self.cfg = cfg
        self.urls = [u.rstrip("/") for u in cfg.urls]
        if not self.urls:
            raise UserError("--backend server needs --url (one per server)")
        self.info: dict = {}

    # -- before any work ---------------------------------------------------------------
    def check(self, tokenizer, longest: int) -> dict:
        """Refuse, in one line naming the server, a server that cannot serve this dump.
        Returns what the first server reports (model root, max_model_len, engine version)."""
        probe = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        with self.httpx.Client(timeout=30.0) as client:
            for url in self.urls:
                info = self._check_one(client, url, probe, longest)
                self.info = self.info or info
        return self.info

    def _get(self, client, url: str, path: str, **kw):
        """One checking request, retried like the pass's on transient failures."""
        import time

        for attempt in range(self.cfg.retries):
            try:
                r = client.request("POST" if "json" in kw else "GET", url + path, **kw)
                if r.status_code not in RETRY_STATUS:
                    return r
                problem = f"HTTP {r.status_code}"
            except self.httpx.HTTPError as e:
                problem = type(e).__name__
            if attempt + 1 < self.cfg.retries:
                time.sleep(min(30.0, self.cfg.backoff * 2**attempt) * (0.5 + random.random()))
        raise UserError(f"server {url} does not answer ({problem}, {self.cfg.retries} tries): "
                        f"start it, or fix --url")

    def _check_one(self, client, url: str, probe: list[int], longest: int) -> dict:
        r = self._get(client, url, "/v1/models")
        models = r.json().get("data", []) if r.status_code == 200 else []
        names = [m.get("id") for m in models]
        if self.cfg.model not in names:
            raise UserError(f"server {url} serves {names or 'no model'}, not {self.cfg.model!r}"
                            f": pass --model with the served name, or fix --url")
        model = models[names.index(self.cfg.model)]
        max_len = model.get("max_model_len")
        if max_len is not None and longest + 1 > max_len:  # + the one token it generates
            raise UserError(f"server {url} has max_model_len {max_len}, too small for the "
                            f"longest sequence ({longest} tokens, plus one generated): restart "
                            f"it with --max-model-len {longest + 1} or more, or pass "
                            f"--max-length {max_len - 1}")
        r = self._get(client, url, "/tokenize", json={"model": self.cfg.model,
                                                        "prompt": PROBE_TEXT,
                                                        "add_special_tokens": False})
        theirs = r.json().get("tokens") if r.status_code == 200 else None
        if theirs != probe:
            raise UserError(f"server {url}'s tokenizer disagrees with the local one on a probe "
                            f"text: give --tokenizer the served model's tokenizer")
        r = self._get(client, url, "/v1/completions", json=self._request(probe))
        if r.status_code != 200:
            message = _error_message(r)
            hint = (f"restart it with --max-logprobs {self.cfg.top_k} or more, or lower "
                    f"--top-k" if "logprobs" in message else "see the server's log")
            raise UserError(f"server {url} refused a --top-k {self.cfg.top_k} probe "
                            f"({message}): {hint}")
        version = self._get(client, url, "/version")
        return {"root": model.get("root"), "max_model_len": max_len,
                "engine": "vllm " + version.json().get("version", "?")
                if version.status_code == 200 else "unknown"}

    def _request(self, ids: list[int]) -> dict:
        return {"model": self.cfg.model, "prompt": ids, "max_tokens": 1,
                "prompt_logprobs": self.cfg.top_k, "temperature": 1.0}

    # -- the pass ----------------------------------------------------------------------
    def score(self, seqs: list[TokenizedSequence], on_done=None) -> list[dict[str, np.ndarray]]:
        """Per sequence, the arrays of its supervised positions (the Teacher interface)."""
        return asyncio.run(self._score_all(seqs, on_done))

    async def _score_all(self, seqs, on_done):
        limits = self.httpx.Limits(max_connections=self.cfg.concurrency * len(self.urls))
        gates = [asyncio.Semaphore(self.cfg.concurrency) for _ in self.urls]
        async with self.httpx.AsyncClient(timeout=self.cfg.timeout, limits=limits) as client:
            tasks = [asyncio.create_task(self._one(client, gates, i, s, on_done))
                     for i, s in enumerate(seqs)]
            try:
                return await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _one(self, client, gates, i: int, seq: TokenizedSequence, on_done):
        last = ""
        for attempt in range(self.cfg.retries):
            at = (i + attempt) % len(self.urls)  # spread, and move on after a failure
            try:
                async with gates[at]:
                    body = await self._post(client, self.urls[at], seq)
                try:
                    out = parse_prompt_logprobs(body, seq, self.cfg.top_k)
                except (KeyError, TypeError, IndexError) as e:
                    raise Retry(f"an answer without the prompt log-probs ({e!r})") from None
                if on_done is not None:
                    on_done(len(seq.input_ids))
                return out
            except Retry as e:
                last = f"{self.urls[at]}: {e}"
                delay = min(30.0, self.cfg.backoff * 2**attempt) * (0.5 + random.random())
                await asyncio.sleep(delay)
        raise UserError(f"the teacher server failed {self.cfg.retries} times on sequence "
                        f"{seq.seq_id} (last: {last}): check the servers, then re-run the same "
                        f"command to resume after the committed shards")

    async def _post(self, client, url: str, seq: TokenizedSequence) -> dict:
        try:
            r = await client.post(url + "/v1/completions",
                                  json=self._request(seq.input_ids.tolist()))
        except self.httpx.TimeoutException:
            raise Retry(f"no answer within {self.cfg.timeout:g} s") from None
        except self.httpx.TransportError as e:
            raise Retry(type(e).__name__) from None
        if r.status_code in RETRY_STATUS:
            raise Retry(f"HTTP {r.status_code}")
        if r.status_code != 200:
            raise UserError(f"server {url} refused a request: HTTP {r.status_code} "
                            f"({_error_message(r)})")
        try:
            return r.json()
        except ValueError:
            raise Retry("a cut-short or malformed answer") from None


def _error_message(r) -> str:
    try:
        return str(r.json()["error"]["message"])
    except Exception:
        return r.text[:200]
