"""An API teacher: any OpenAI-compatible chat-completions endpoint, through the `openai` client.

vLLM, SGLang, llama.cpp's server, hosted APIs: at most `concurrency` requests in flight, each
finished sample handed to `on_sample` as it lands.

Blocks and seeds. A question's sample indices fall into fixed blocks [0, B), [B, 2B), ...
(B = `samples_per_request`), whatever the cache holds. A block is one request with `n` = its
last wanted index + 1 - its start and `seed = sample_seed(params, question, start)`; choice j
is sample start + j, so an index's block, seed and position never depend on what was cached
(vLLM seeds choice j with seed + j: there an index's sample is the same whichever prefix is
asked). A server that ignores `n` (llama.cpp's servers answer one choice) gets one request per
index with `seed = sample_seed(params, question, index)`: for a block's first index that is the
block's own request, so the choice that came back is sample `start` either way. "auto" uses
blocks of AUTO_BLOCK_SIZE and sends the first request with n > 1 alone; a response with fewer
choices than asked switches any setting to one sample per request. The grouping is not in the
cache key (`teacher.cache`): a changed B reuses cached samples; a resumed run with the same B
reproduces an uninterrupted one (with a server that honours `seed`).

Retries: 429 (honouring Retry-After, seconds or an HTTP date), 5xx, timeouts and dropped
connections, up to `max_attempts` sends, after full-jitter exponential backoff; any other 4xx
fails at once. Failures are one-line `TeacherError`s naming the question.

`model_id` is "openai-api:<model>", without the base URL: a sample depends on the weights and
the sampling, not on the host, so a model moved to another host keeps its cache. A server
whose model name does not identify the weights (llama.cpp serves what it loaded under any
name) needs a distinct name (llama.cpp's --alias) or a cache folder of its own.

The API key comes from the environment variable `api_key_env` only and is never logged, stored
or put in a message: server error text is scrubbed of it, and the client's exceptions (which
hold the request and its headers) are never raised or chained. `TeacherStats` is
single-threaded by construction: only the event loop that `generate` runs in the calling
thread changes it; read it in `on_sample` or after `generate` returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import openai

from mcckd_jax.teacher.base import OnSample, Sample, SampleRequest, SamplingParams, sample_seed

AUTO_BLOCK_SIZE = 8  # samples per request in "auto" mode when the server honours n
MAX_RETRY_AFTER_S = 600.0  # a longer Retry-After is waited for this long
NO_KEY = "no-key"  # sent when api_key_env is "": the client needs some key
FAULT_KINDS = ("rate_limit", "server_error", "timeout", "connection")
_FATAL = "fatal"
_MESSAGE_CHARS = 300  # of a server's error message in ours

logger = logging.getLogger(__name__)

Uniform = Callable[[float, float], float]


class TeacherError(RuntimeError):
    """A teacher that cannot go on; `str(error)` is one line."""


@dataclasses.dataclass
class TeacherStats:
    """What the teacher did, for the run's report (cumulative over `generate` calls)."""

    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0  # requests sent again after a fault
    faults: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(FAULT_KINDS, 0))  # by kind, final failures too
    failed_requests: int = 0  # given up on (a non-retryable status, or max_attempts faults)
    samples: int = 0  # samples handed to on_sample
    prompt_tokens: int = 0  # from the responses' usage
    completion_tokens: int = 0
    retry_wait_s: float = 0.0  # time spent waiting before retries
    cost_usd: float | None = None  # from the prices, when given

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)


# Pure parts: backoff, Retry-After, token shares, blocks.


def backoff_delay(attempt: int, base_s: float, cap_s: float, uniform: Uniform) -> float:
    """Full-jitter backoff before resending after fault number `attempt` (1, 2, ...): uniform
    in [0, min(cap_s, base_s * 2**(attempt - 1)))."""
    bound = cap_s if attempt > 64 else min(cap_s, base_s * 2.0 ** (attempt - 1))
    return uniform(0.0, bound)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date (0 when past);
    None when absent or unreadable. `now` is the Unix time."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment is None or moment.tzinfo is None:
            return None
        return max(0.0, moment.timestamp() - now)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def retry_delay(attempt: int, retry_after: float | None, base_s: float, cap_s: float,
                uniform: Uniform) -> float:
    """The server's Retry-After when it gave one (at most MAX_RETRY_AFTER_S), else the
    jittered backoff."""
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER_S)
    return backoff_delay(attempt, base_s, cap_s, uniform)


def split_tokens(total: int, weights: Sequence[int]) -> list[int]:
    """`total` split in proportion to `weights` (equally when all are 0), summing exactly
    (largest remainders get the leftovers)."""
    if not weights:
        return []
    weights = list(weights) if any(weights) else [1] * len(weights)
    exact = [total * w / sum(weights) for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])
    for i in order[:total - sum(shares)]:
        shares[i] += 1
    return shares


@dataclasses.dataclass(frozen=True)
class Block:
    """One request's worth: samples start..start+size-1 of a question (`wanted` among them)."""

    question_key: str
    messages: tuple[tuple[str, str], ...]
    start: int
    size: int  # the n asked: up to the last wanted index
    wanted: tuple[tuple[int, tuple[SampleRequest, ...]], ...]  # (index, requests for it)


def plan_blocks(requests: Sequence[SampleRequest], block_size: int) -> list[Block]:
    """Requests grouped into the fixed blocks of `block_size` indices of each question, in the
    order of the questions' first requests."""
    by_prompt: dict[tuple, dict[int, list[SampleRequest]]] = {}
    for request in requests:
        if isinstance(request.sample_index, bool) or not isinstance(request.sample_index, int) \
                or request.sample_index < 0:
            raise ValueError(f"question {request.question_key}: sample_index must be an int >= 0,"
                             f" got {request.sample_index!r}")
        prompt = by_prompt.setdefault((request.question_key, request.messages), {})
        prompt.setdefault(request.sample_index, []).append(request)
    blocks = []
    for (question_key, messages), by_index in by_prompt.items():
        for start in sorted({index // block_size * block_size for index in by_index}):
            wanted = tuple((index, tuple(by_index[index])) for index in sorted(by_index)
                           if start <= index < start + block_size)
            blocks.append(Block(question_key, messages, start, wanted[-1][0] - start + 1, wanted))
    return blocks


def single_blocks(block: Block, indices: Sequence[int]) -> list[Block]:
    """One-sample blocks for some wanted indices of `block`."""
    requests = dict(block.wanted)
    return [Block(block.question_key, block.messages, index, 1, ((index, requests[index]),))
            for index in indices]


@dataclasses.dataclass(frozen=True)
class _Fault:
    kind: str  # one of FAULT_KINDS, or _FATAL
    detail: str
    retry_after: float | None = None


def _one_line(text: str, limit: int = _MESSAGE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _server_message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        return _one_line(message if message else body)
    return _one_line(body if body else "(no message)")


def classify(error: Exception, timeout_s: float) -> _Fault:
    """The fault a client exception stands for: its kind and a one-line detail."""
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        kind = "rate_limit" if status == 429 else "server_error" if status >= 500 else _FATAL
        retry_after = parse_retry_after(error.response.headers.get("retry-after"), time.time())
        return _Fault(kind, f"HTTP {status}: {_server_message(error)}", retry_after)
    if isinstance(error, openai.APITimeoutError):
        return _Fault("timeout", f"no response within {timeout_s:g} s")
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
        return _Fault("connection", f"connection failed ({_one_line(reason)})")
    return _Fault(_FATAL, f"{type(error).__name__}: {_one_line(error)}")


class ApiTeacher:
    """A Teacher (`teacher.base`) over an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout_s: float = 60.0, max_attempts: int = 8,
                 samples_per_request: int | str = "auto", backoff_base_s: float = 0.5,
                 backoff_cap_s: float = 30.0, prices: tuple[float, float] | None = None):
        _check_settings(base_url, model, concurrency, timeout_s, max_attempts,
                        samples_per_request, backoff_base_s, backoff_cap_s, prices)
        self.base_url, self.model, self.api_key_env = base_url, model, api_key_env
        self.concurrency, self.timeout_s, self.max_attempts = concurrency, timeout_s, max_attempts
        self.samples_per_request = samples_per_request
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self.prices = prices  # (USD per million prompt tokens, per million completion tokens)
        self.stats = TeacherStats(cost_usd=0.0 if prices else None)
        self._api_key = _read_key(api_key_env)
        # None: not known yet ("auto"); an int setting is trusted until a short response.
        self.honours_n: bool | None = None if samples_per_request == "auto" else True
        self._random = random.Random()

    @property
    def model_id(self) -> str:
        return f"openai-api:{self.model}"

    def generate(self, requests: Sequence[SampleRequest], params: SamplingParams,
                 on_sample: OnSample) -> None:
        """Samples every request, calling `on_sample` in this thread as each lands (runs its
        own event loop: not callable from inside a running one)."""
        if requests:
            asyncio.run(self._generate(list(requests), params, on_sample))

    def _block_size(self) -> int:
        chosen = AUTO_BLOCK_SIZE if self.samples_per_request == "auto" else self.samples_per_request
        return 1 if self.honours_n is False else chosen

    async def _generate(self, requests, params, on_sample) -> None:
        semaphore = asyncio.Semaphore(self.concurrency)
        async with openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key or NO_KEY,
                                      max_retries=0, timeout=self.timeout_s) as client:
            def run(block: Block):
                return self._run_block(client, semaphore, block, params, on_sample)

            blocks = plan_blocks(requests, self._block_size())
            probe = None if self.honours_n is not None else next(
                (block for block in blocks if block.size > 1), None)
            if probe is not None:  # "auto": learn whether n is honoured from one request
                await run(probe)
                blocks.remove(probe)
            if self.honours_n is False:
                blocks = [single for block in blocks
                          for single in single_blocks(block, [i for i, _ in block.wanted])]
            await _all(run(block) for block in blocks)

    async def _run_block(self, client, semaphore, block: Block, params, on_sample) -> None:
        seed = sample_seed(params, block.question_key, block.start)
        response = await self._request(client, semaphore, block, seed, params)
        missing = self._deliver(block, response, on_sample)
        if block.size > 1 and self.honours_n is not False:
            self.honours_n = not missing
            if missing:
                logger.warning("%s answered %d of %d choices: one sample per request from now "
                               "on", self.base_url, len(response.choices), block.size)
        if missing and block.size == 1:
            raise TeacherError(f"question {block.question_key}, sample {block.start}: the "
                               "server returned no choice")
        if missing:
            await _all(self._run_block(client, semaphore, single, params, on_sample)
                       for single in single_blocks(block, missing))

    async def _request(self, client, semaphore, block: Block, seed: int, params):
        """The response to the block's request, after retries; raises TeacherError."""
        for attempt in range(1, self.max_attempts + 1):
            async with semaphore:
                outcome = await self._send(client, block, seed, params)
            if not isinstance(outcome, _Fault):
                return outcome
            if outcome.kind != _FATAL:
                self.stats.faults[outcome.kind] += 1
            if outcome.kind == _FATAL or attempt == self.max_attempts:
                break
            delay = retry_delay(attempt, outcome.retry_after, self.backoff_base_s,
                                self.backoff_cap_s, self._random.uniform)
            logger.info("question %s: %s; retry %d of %d in %.2f s", block.question_key,
                        self._scrub(outcome.detail), attempt, self.max_attempts - 1, delay)
            self.stats.retries += 1
            self.stats.retry_wait_s += delay
            await asyncio.sleep(delay)
        self.stats.failed_requests += 1
        what = (f"question {block.question_key}, samples {block.start}-"
                f"{block.start + block.size - 1}")
        if outcome.kind == _FATAL:
            raise TeacherError(f"{what}: the server refused the request: "
                               f"{self._scrub(outcome.detail)}")
        raise TeacherError(f"{what}: failed {self.max_attempts} times; last fault: "
                           f"{self._scrub(outcome.detail)}")

    async def _send(self, client, block: Block, seed: int, params: SamplingParams):
        """The response, or the fault (the client's exception never leaves this function:
        it holds the request's headers)."""
        self.stats.requests += 1
        try:
            return await client.chat.completions.create(
                model=self.model, messages=[{"role": r, "content": c} for r, c in block.messages],
                n=block.size, seed=seed, temperature=params.temperature, top_p=params.top_p,
                max_tokens=params.max_tokens)
        except openai.OpenAIError as error:
            return classify(error, self.timeout_s)

    def _deliver(self, block: Block, response, on_sample: OnSample) -> list[int]:
        """Hands the block's wanted samples to on_sample; returns the wanted indices missing."""
        choices = {c.index: c for c in response.choices or () if 0 <= c.index < block.size}
        usage = response.usage
        prompt_tokens = (usage.prompt_tokens or 0) if usage else 0
        completion_tokens = (usage.completion_tokens or 0) if usage else 0
        self._count_usage(prompt_tokens, completion_tokens)
        order = sorted(choices)
        lengths = [len(choices[j].message.content or "") for j in order]
        shares = dict(zip(order, split_tokens(completion_tokens, lengths)))
        missing = []
        for index, requests in block.wanted:
            choice = choices.get(index - block.start)
            if choice is None:
                missing.append(index)
                continue
            sample = Sample(text=choice.message.content or "", prompt_tokens=prompt_tokens,
                            completion_tokens=shares[index - block.start],
                            finish_reason=choice.finish_reason or "stop")
            self.stats.samples += 1
            for request in requests:
                on_sample(request, sample)
        return missing

    def _count_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        if self.prices:
            self.stats.cost_usd = (self.stats.prompt_tokens * self.prices[0]
                                   + self.stats.completion_tokens * self.prices[1]) / 1e6

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "<api key>") if self._api_key else text


async def _all(coroutines) -> None:
    """Runs the coroutines concurrently; the first failure cancels the rest and is raised as
    itself (not in an ExceptionGroup, and outside the handler: nothing chained to it)."""
    first = None
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in coroutines:
                group.create_task(coroutine)
    except BaseExceptionGroup as failures:
        first = failures.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
    if first is not None:
        raise first


def _read_key(api_key_env: str) -> str:
    key = os.environ.get(api_key_env, "").strip() if api_key_env else ""
    if api_key_env and not key:
        raise TeacherError(f"the environment variable {api_key_env} holding the API key is not "
                           "set (for a server that needs no key, set api_key_env to '')")
    return key


def _check_settings(base_url, model, concurrency, timeout_s, max_attempts, samples_per_request,
                    backoff_base_s, backoff_cap_s, prices) -> None:
    def is_count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    for ok, message in [
            (isinstance(base_url, str) and base_url.startswith(("http://", "https://")),
             f"base_url must be an http(s) URL, got {base_url!r}"),
            (isinstance(model, str) and bool(model.strip()), "model must be a non-empty name"),
            (is_count(concurrency), f"concurrency must be an int >= 1, got {concurrency!r}"),
            (timeout_s > 0, f"timeout_s must be > 0, got {timeout_s!r}"),
            (is_count(max_attempts), f"max_attempts must be an int >= 1, got {max_attempts!r}"),
            (samples_per_request == "auto" or is_count(samples_per_request),
             f"samples_per_request must be 'auto' or an int >= 1, got {samples_per_request!r}"),
            (0 < backoff_base_s <= backoff_cap_s, "need 0 < backoff_base_s <= backoff_cap_s"),
            (prices is None or (len(prices) == 2 and min(prices) >= 0), "prices must be (USD per "
             "million prompt tokens, USD per million completion tokens), both >= 0")]:
        if not ok:
            raise ValueError(message)
