"""Served teacher: prompt log-probs from running vLLM OpenAI-compatible servers.

Per sequence one `POST /v1/completions` with the token ids as the prompt, `max_tokens=1` and
`prompt_logprobs=k`: the same numbers the offline vLLM backend reads (teacher/vllm.py), over
HTTP. The fleet behind the URLs is the distributed engine (its own tensor/data parallelism);
we are its client:
- requests are spread over the URLs, at most `concurrency` in flight per server;
- `timeout` bounds a whole request (connect, send, every byte of the answer);
- a connection error, a request past its timeout, a 5xx, or an answer of any wrong shape
  (not JSON, cut short, a log-prob list of another length, other token ids) is retried on
  the next server after an exponential back-off with jitter; after `retries` failed tries
  of one sequence the pass stops with one line naming the server and the sequence (the
  shards committed so far stay, and a re-run resumes after them);
- a 429 is the server saying "busy", not failing: it waits the answer's `Retry-After`
  (at most MAX_RETRY_AFTER s) or the back-off, and does not use up `retries` (at most
  `busy_tries` of them per sequence);
- a sequence's arrays exist only once its whole answer is parsed, and dump.py writes whole
  shards, so a retried request is never counted twice.
Before any work `check` asks every server: its model (`/v1/models`) is the one named, its
`max_model_len` fits the longest sequence, its tokenizer agrees with ours on a probe
(`/tokenize`), and it scores a fixed probe sequence with `prompt_logprobs=k` (accepted:
`--max-logprobs`; the answer's target log-probs are the served teacher's numeric
fingerprint, which every server must share within schema.PROBE_TOLERANCE and which goes into the
card). URLs that do not answer at all are left out with one warning; none answering is an
error. A base URL may end in `/v1`, as OpenAI clients write it.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import numpy as np

from atkd_cache.cache.schema import probe_gap, probes_agree
from atkd_cache.data import TokenizedSequence
from atkd_cache.errors import UserError, first_line
from atkd_cache.teacher.vllm import position_arrays, ranked_entries

RETRY_STATUS = {429, 500, 502, 503, 504}
CHECK_TRIES = 4  # tries of each checking request (a dead URL is left out after ~4 s)
MAX_RETRY_AFTER = 60.0  # seconds: a longer Retry-After is waited this long, then retried

# Sent with every request so that the server's defaults (vLLM fills unset sampling fields
# from the model's generation_config.json) cannot penalise or warp what we are given.
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
           "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
PROBE_TEXT = ("The capital of France is Paris. 1 + 2 = 3; naïve café, 東京. A teacher scores "
              "every token of this sentence, and every server of one teacher must agree.")


@dataclass
class ServerConfig:
    """Where the teacher is served and how hard to try."""

    urls: list[str]
    model: str  # the served model name (`--served-model-name`, or the path it was started on)
    top_k: int
    concurrency: int = 8  # requests in flight per server
    timeout: float = 300.0  # seconds per request, the whole answer included
    retries: int = 8  # failed tries per sequence before the pass stops
    backoff: float = 0.5  # seconds, doubled per try (with jitter), at most 30
    busy_tries: int = 64  # 429 answers per sequence before they count as a failure


def base_url(url: str) -> str:
    """A server's base URL: without a trailing slash or `/v1` (`http://h:8000/v1` and
    `http://h:8000` name the same server; we add the API paths)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def retry_after(headers) -> float | None:
    """Seconds a 429's `Retry-After` asks for (a number or an HTTP date), if it says."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def probe_logprobs(body: dict, probe: list[int]) -> list[float]:
    """The target log-probs of the probe sequence (positions 1..n-1) from a scoring answer;
    ValueError/KeyError/TypeError on an answer of another shape."""
    entries = body["choices"][0]["prompt_logprobs"]
    if entries is None or len(entries) != len(probe):
        raise ValueError(f"{0 if entries is None else len(entries)} prompt log-prob entries "
                         f"for a {len(probe)}-token probe")
    return [float(e[str(t)]["logprob"]) for e, t in zip(entries[1:], probe[1:], strict=True)]


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
        raise ValueError(f"{0 if entries is None else len(entries)} prompt log-prob entries "
                         f"for a {len(seq.input_ids)}-token sequence")
    parsed = [{int(tid): Logprob(v["logprob"], v["rank"]) for tid, v in e.items()}
              for e in entries[1:]]  # entry 0 is empty: nothing predicts the first token
    targets = seq.input_ids[1:].astype(np.int64)
    target_lp, topk_ids, topk_lp = ranked_entries(parsed, targets, k)
    sup = seq.supervised
    return position_arrays(target_lp[sup], topk_ids[sup], topk_lp[sup])


def parse_reply(body: dict, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A generated reply's token ids and the cache arrays of its positions from a completions
    response with `logprobs=k` and `return_tokens_as_token_ids`: per step a dict of
    "token_id:N" -> raw log-prob holding the sampled token and the top-k (k + 1 entries when
    the sampled token is outside the top-k, else k)."""
    choice = body["choices"][0]
    reply = np.asarray(choice["token_ids"], dtype=np.int64)
    steps = choice["logprobs"]["top_logprobs"]
    if len(steps) != len(reply):
        raise ValueError(f"{len(steps)} log-prob steps for {len(reply)} reply tokens")
    entries = []
    for token, step in zip(reply.tolist(), steps, strict=True):
        ranked = {int(key.rsplit(":", 1)[1]): value for key, value in step.items()}
        order = sorted(ranked, key=lambda t: -ranked[t])  # stable: the server's rank order
        if len(ranked) > k:  # the sampled token is outside the top-k
            order.remove(token)
        entry = {t: Logprob(ranked[t], r + 1) for r, t in enumerate(order)}
        entry.setdefault(token, Logprob(ranked[token], k + 1))
        entries.append(entry)
    target_lp, topk_ids, topk_lp = ranked_entries(entries, reply, k)
    return reply, position_arrays(target_lp, topk_ids, topk_lp)


class ServerTeacher:
    """A client of one or many vLLM servers (module docstring)."""

    def __init__(self, cfg: ServerConfig):
        try:
            import httpx
        except ImportError:
            raise UserError("--backend server needs httpx: pip install httpx") from None
        self.httpx = httpx
        self.cfg = cfg
        self.urls = list(dict.fromkeys(base_url(u) for u in cfg.urls))
        if not self.urls:
            raise UserError("--backend server needs --url (one per server)")
        self.info: dict = {}

    # -- before any work ---------------------------------------------------------------
    def check(self, tokenizer, longest: int, generate: bool = False, warn=print) -> dict:
        """Refuse, in one line naming the server, a server that cannot serve this dump (with
        `generate`, also one whose sample log-probs are not raw), or servers that compute
        the teacher differently (the probe). Servers that do not answer are dropped with one
        `warn` line; none answering is refused. Returns what the first server reports
        (model root, max_model_len, engine version) and the probe's answer."""
        probe = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
        live, dead, answers = [], [], {}
        with self.httpx.Client(timeout=30.0) as client:
            for url in self.urls:
                try:
                    info = self._check_one(client, url, probe, longest)
                    if generate:
                        self._check_raw_logprobs(client, url, probe)
                except _NoAnswer as e:
                    dead.append(f"{url} ({e})")
                    continue
                answers[url] = info.pop("probe")
                live.append(url)
                self.info = self.info or info
        if not live:
            raise UserError(f"no server answers ({'; '.join(dead)}): start them, or fix --url")
        if dead:
            warn(f"warning: left out {len(dead)} of {len(self.urls)} servers that do not "
                 f"answer: {'; '.join(dead)}")
        first = live[0]
        for url in live[1:]:
            if not probes_agree(answers[first], answers[url]):
                raise UserError(
                    f"servers {first} and {url} compute the teacher differently (probe "
                    f"{probe_gap(answers[first], answers[url])}): serve the same weights "
                    f"with the same --dtype and build on every server")
        self.urls = live
        self.info["probe"] = answers[first]
        return self.info

    def _get(self, client, url: str, path: str, **kw):
        """One checking request, retried like the pass's on transient failures; _NoAnswer
        when it never gets an answer."""
        tries = min(self.cfg.retries, CHECK_TRIES)
        for attempt in range(tries):
            try:
                r = client.request("POST" if "json" in kw else "GET", url + path, **kw)
                if r.status_code not in RETRY_STATUS:
                    return r
                problem = f"HTTP {r.status_code}"
            except self.httpx.HTTPError as e:
                problem = type(e).__name__
            if attempt + 1 < tries:
                time.sleep(self._backoff(attempt))
        raise _NoAnswer(f"{problem}, {tries} tries")

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
        try:
            answer = probe_logprobs(r.json(), probe)
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise UserError(f"server {url} answered the probe without the log-probs asked "
                            f"for ({first_line(e)}): is it a vLLM server?") from None
        version = self._get(client, url, "/version")
        return {"root": model.get("root"), "max_model_len": max_len,
                "engine": "vllm " + version.json().get("version", "?")
                if version.status_code == 200 else "unknown", "probe": answer}

    def _request(self, ids: list[int]) -> dict:
        """A scoring request: the prompt's log-probs, one (ignored) token generated."""
        return {"model": self.cfg.model, "prompt": ids, "max_tokens": 1,
                "prompt_logprobs": self.cfg.top_k, **NEUTRAL}

    def _generation_request(self, prompt, spec) -> dict:
        """A reply request: sampled as the offline vLLM backend samples it (the same fields,
        generate.vllm_sampling), with the raw top-k log-probs of every generated token, as
        token ids."""
        from atkd_cache.teacher.generate import vllm_sampling

        return {"model": self.cfg.model, "prompt": prompt.input_ids.tolist(), **NEUTRAL,
                **vllm_sampling(spec, prompt.seq_id, self.cfg.top_k),
                "return_tokens_as_token_ids": True, "return_token_ids": True}

    def _check_raw_logprobs(self, client, url: str, probe: list[int]) -> None:
        """Refuse a server whose sample log-probs are not raw (started with another
        --logprobs-mode): a reply token's log-prob at temperature 0.25 must equal the
        prompt log-prob of the same token at the same position (T = 1)."""
        from atkd_cache.teacher.generate import GenerationSpec, Prompt

        request = self._generation_request(Prompt(0, np.asarray(probe, dtype=np.int64)),
                                           GenerationSpec(temperature=0.25, max_new_tokens=1))
        r = self._get(client, url, "/v1/completions", json=request, timeout=60.0)
        if r.status_code != 200:
            raise UserError(f"server {url} refused a generation probe "
                            f"({_error_message(r)}): see the server's log")
        token, sampled = parse_reply(r.json(), self.cfg.top_k)
        r = self._get(client, url, "/v1/completions",
                      json=self._request(probe + [int(token[0])]), timeout=60.0)
        if r.status_code != 200:
            raise UserError(f"server {url} refused a scoring probe ({_error_message(r)}): "
                            f"see the server's log")
        entry = r.json()["choices"][0]["prompt_logprobs"][-1]
        scored = entry[str(int(token[0]))]["logprob"]
        if abs(scored - float(sampled["target_logprob"][0])) > 1e-3:
            raise UserError(f"server {url} returns processed sample log-probs, not "
                            f"raw ones: restart it with --logprobs-mode raw_logprobs")

    # -- the pass ----------------------------------------------------------------------
    def score(self, seqs: list[TokenizedSequence], on_done=None) -> list[dict[str, np.ndarray]]:
        """Per sequence, the arrays of its supervised positions (the Teacher interface)."""
        def parse(body, seq):
            return parse_prompt_logprobs(body, seq, self.cfg.top_k)

        return asyncio.run(self._all(seqs, lambda seq: self._request(seq.input_ids.tolist()),
                                     parse, lambda seq: len(seq.input_ids), on_done))

    def generate(self, prompts: list, spec, on_done=None) -> list[tuple[TokenizedSequence, dict]]:
        """One reply per prompt (teacher/generate.Prompt): the finished sequence and its
        per-position arrays from the server's raw sample log-probs (the Teacher interface)."""
        from atkd_cache.teacher.generate import reply_sequence

        def parse(body, prompt):
            reply, arrays = parse_reply(body, self.cfg.top_k)
            return reply_sequence(prompt, reply), arrays

        return asyncio.run(self._all(prompts, lambda p: self._generation_request(p, spec),
                                     parse, lambda p: 1, on_done))

    async def _all(self, items, request_of, parse, size, on_done):
        limits = self.httpx.Limits(max_connections=self.cfg.concurrency * len(self.urls))
        gates = [asyncio.Semaphore(self.cfg.concurrency) for _ in self.urls]
        async with self.httpx.AsyncClient(timeout=self.cfg.timeout, limits=limits) as client:
            tasks = [asyncio.create_task(self._one(client, gates, i, item, request_of, parse,
                                                   size, on_done))
                     for i, item in enumerate(items)]
            try:
                return await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _one(self, client, gates, i: int, item, request_of, parse, size, on_done):
        last, failures, busy, turn = "", 0, 0, i
        while True:
            at = turn % len(self.urls)  # spread, and move on after a failure
            turn += 1
            try:
                async with gates[at]:
                    body = await self._post(client, self.urls[at], request_of(item))
                try:
                    out = parse(body, item)
                except (KeyError, TypeError, IndexError, ValueError) as e:
                    raise Retry(f"an answer without the log-probs asked for "
                                f"({first_line(e)})") from None
                if on_done is not None:
                    on_done(size(item))
                return out
            except Busy as e:
                busy += 1
                if busy <= self.cfg.busy_tries:
                    wait = e.seconds if e.seconds is not None else self._backoff(busy - 1)
                    await asyncio.sleep(min(MAX_RETRY_AFTER, wait) * (1 + 0.25 * random.random()))
                    continue
                last, failures = f"{self.urls[at]}: HTTP 429 {busy} times", failures + 1
            except Retry as e:
                last, failures = f"{self.urls[at]}: {e}", failures + 1
            if failures >= self.cfg.retries:
                raise UserError(f"the teacher server failed {self.cfg.retries} times on sequence "
                                f"{item.seq_id} (last: {last}): check the servers, then re-run "
                                f"the same command to resume after the committed shards")
            await asyncio.sleep(self._backoff(failures - 1))

    def _backoff(self, attempt: int) -> float:
        return min(30.0, self.cfg.backoff * 2**attempt) * (0.5 + random.random())

    async def _post(self, client, url: str, request: dict) -> dict:
        try:  # wait_for bounds the whole request; httpx's timeout bounds each read only
            r = await asyncio.wait_for(client.post(url + "/v1/completions", json=request),
                                       self.cfg.timeout)
        except (asyncio.TimeoutError, self.httpx.TimeoutException):
            raise Retry(f"no whole answer within {self.cfg.timeout:g} s") from None
        except self.httpx.TransportError as e:
            raise Retry(type(e).__name__) from None
        if r.status_code == 429:
            raise Busy(retry_after(r.headers))
        if r.status_code in RETRY_STATUS:
            raise Retry(f"HTTP {r.status_code}")
        if r.status_code != 200:
            raise UserError(f"server {url} refused a request: HTTP {r.status_code} "
                            f"({_error_message(r)})")
        try:
            return r.json()
        except ValueError:
            raise Retry("a cut-short or malformed answer") from None


class _NoAnswer(Exception):
    """A server that never answered a checking request (left out of the fleet)."""


class Busy(Exception):
    """A 429: the server asks us to come back later (after `seconds`, if it said)."""

    def __init__(self, seconds: float | None):
        super().__init__(seconds)
        self.seconds = seconds


def _error_message(r) -> str:
    try:
        return str(r.json()["error"]["message"])
    except Exception:
        return r.text[:200]
