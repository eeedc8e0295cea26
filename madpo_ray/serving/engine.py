"""A batched transformers generation engine for serving (the vLLM engine plugs in beside it).

Every request carries its own `GenParams`: rows that share max_tokens (and greedy or not) share
one forward pass, but each row keeps its own stop strings, cancel flag, temperature, top_p and
random stream (RowSampler), so one request's settings or seed never change another's output,
and the process-wide RNG is never touched. The tokenizer is shared by the event loop and the
generation threads, so every call on it is serialised (SerialTokenizer). Failures inside generation threads are handed to the waiting caller
(never left to hang a queue), and a stalled stream raises after a timeout.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Generator, Iterable, Iterator, Optional, Sequence, Union

import torch

from madpo_ray.data.chat import ChatPrompt, ClientInputError, render_chat
from madpo_ray.data.collate import encode_prompt, left_pad
from madpo_ray.models import load_causal_lm, load_tokenizer

# Below this temperature logits / T overflow float32 and sampling dies on inf/nan
# probabilities; such a request is decoded greedily (its limit, not an error).
MIN_TEMPERATURE = 1e-2


class RequestCancelled(RuntimeError):
    """The caller went away (timeout or disconnect) before its row was generated."""


@dataclass
class GenParams:
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Optional[list[str]] = None
    seed: Optional[int] = None
    sample: int = 0  # which of a request's n samples this row is: seeded samples of one request differ by it
    adapter: Optional[str] = None  # a LoRA adapter served beside the base (vLLM only), by name
    # Set by the route when its caller times out or disconnects; generation then stops early.
    cancel: Optional[threading.Event] = field(default=None, compare=False, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def key(self) -> tuple:
        """Requests sharing this key can go through one `generate` call (stop strings, sampling
        settings and seeds are per row)."""
        return (self.max_tokens, self.greedy)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass
class GenResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StreamEnd:
    """The last item of a stream, after its text deltas: why it ended and what it counted, for the
    closing chunk's finish_reason and the usage chunk (`stream_options.include_usage`)."""
    finish_reason: str  # as GenResult's
    prompt_tokens: int
    completion_tokens: int


def apply_stop(text: str, stop: Optional[list[str]]) -> tuple[str, bool]:
    if not stop:
        return text, False
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def per_row(params: Union[GenParams, Sequence[GenParams]], n: int) -> list[GenParams]:
    """One GenParams per row: a single one is shared, a list must match the rows."""
    rows = [params] * n if isinstance(params, GenParams) else list(params)
    if len(rows) != n:
        raise ValueError(f"{len(rows)} GenParams for {n} prompts")
    return rows


SAMPLE_STRIDE = 0x9E3779B97F4A7C15  # odd, so the n samples of one seed get n distinct streams


def row_generator(p: GenParams) -> torch.Generator:
    """The row's own random stream: from its seed (and which of the request's samples it is), else
    from fresh entropy. Never the process-wide RNG: that one is shared by every request, so seeding
    it made the next unseeded request of another client predictable."""
    g = torch.Generator()
    if p.seed is None:
        g.seed()
    else:  # sample 0 takes the seed as given: a seed torch cannot take fails here, for this row only
        g.manual_seed(p.seed if p.sample == 0 else (p.seed + p.sample * SAMPLE_STRIDE) % 2**63)
    return g


class RowSampler:
    """A logits processor that draws each row's next token from that row's own generator, with its
    own temperature and top_p, and leaves only that token possible, so the greedy decoding it runs
    under picks it. HF's own sampling draws every row from the process-wide RNG: a row's tokens
    then depended on which other rows shared its batch, and a seed reached other requests."""

    def __init__(self, rows: Sequence[GenParams]):
        self.generators = [row_generator(p) for p in rows]
        self.temperature = torch.tensor([[max(p.temperature, MIN_TEMPERATURE)] for p in rows])
        self.top_p = torch.tensor([[p.top_p] for p in rows])
        self.greedy = torch.tensor([[p.greedy] for p in rows])

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        ranked, order = probs.sort(dim=-1, descending=True)
        ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked > self.top_p, 0.0)  # the nucleus; the top one stays
        cdf = ranked.cumsum(-1)
        u = torch.stack([torch.rand((), generator=g) for g in self.generators]).unsqueeze(-1) * cdf[:, -1:]
        picked = (cdf < u).sum(-1, keepdim=True).clamp(max=cdf.shape[-1] - 1)
        picked = torch.where(self.greedy, 0, picked)  # a greedy row takes the most likely token
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, order.gather(1, picked), 0.0)


class SerialTokenizer:
    """The engine's tokenizer with every call on it serialised. Encoding a chat switches the fast
    tokenizer's `split_special_tokens` per segment; concurrent calls from other threads (the event
    loop, the batch thread, stream threads decoding) then failed with "Already borrowed" or encoded
    user text with special tokens recognised. Attributes pass through, reads and writes."""

    def __init__(self, tokenizer):
        object.__setattr__(self, "inner", tokenizer)
        object.__setattr__(self, "lock", threading.RLock())

    def __call__(self, *args, **kwargs):
        with self.lock:
            return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        value = getattr(self.inner, name)
        if not callable(value):
            return value

        def serialised(*args, **kwargs):
            with self.lock:
                return value(*args, **kwargs)
        return serialised

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)


def complete_characters(text: str) -> str:
    """The text without a trailing U+FFFD: what decoding shows for a UTF-8 character whose last
    bytes were never generated (max_tokens cut it, or the answer ended inside it). vLLM's
    detokenizer holds such bytes back, so a client gets the same text from both backends.
    (vLLM holds back the rest of that token's text too, e.g. a space before the bytes, in
    vocabularies with such tokens; that part is kept here.)"""
    return text.rstrip("\ufffd")


def visible_deltas(pieces: Iterable[str], stop: Optional[list[str]]) -> Generator[str, None, bool]:
    """The deltas a client sees of streamed text pieces: stop strings applied, and a trailing
    incomplete character held back unless a stop string ended the text there (then it is part
    of the answer, as in vLLM). Returns whether a stop string cut the text. The deltas always
    join to the final text: what is shown only grows."""
    text, shown = "", 0
    for piece in pieces:
        text, stopped = apply_stop(text + piece, stop)
        visible = text if stopped else complete_characters(text)
        if len(visible) > shown:
            yield visible[shown:]
            shown = len(visible)
        if stopped:
            return True
    return False


class CancelCriteria:
    """Stop a `generate` call once every row's caller has gone away."""

    def __init__(self, rows: Sequence[GenParams]):
        self.events = [r.cancel for r in rows]

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        done = all(e is not None and e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


class ServerBusy(RuntimeError):
    """The replica is at its limit for this kind of request: 503 with Retry-After, not a queue."""


class StreamAdmitted:
    """The first item of a replica's stream: it was admitted (not over the stream limit). The route
    reads it before answering 200, so a refusal is a proper 503, not an error inside a 200 stream."""


STREAM_ADMITTED = StreamAdmitted()


class Progress:
    """A stopping criterion that never stops: it counts the engine's generation steps, so the health
    check sees progress without taking the engine lock (which a long generation holds)."""

    def __init__(self, engine: "TransformersEngine"):
        self.engine = engine

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.engine.steps += 1
        return torch.zeros((input_ids.shape[0],), dtype=torch.bool)


class TransformersEngine:
    def __init__(self, model_dir: str, threads: int = 1, max_prompt_tokens: int = 448, stream_timeout_s: float = 60.0):
        torch.set_num_threads(threads)
        self.model_dir = model_dir
        self.tokenizer = SerialTokenizer(load_tokenizer(model_dir))
        self.model = load_causal_lm(model_dir).eval()
        self.max_prompt_tokens = max_prompt_tokens
        self.stream_timeout_s = stream_timeout_s
        self.lock = threading.Lock()  # one generate at a time per replica; batching does the rest
        self.steps = 0  # generation steps taken so far (Progress): what the health check watches

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt. A plain prompt keeps its end (as in training); a chat that does
        not fit is refused rather than silently losing its system message."""
        if isinstance(prompt, ChatPrompt):
            ids = encode_prompt(self.tokenizer, prompt)
            if len(ids) > self.max_prompt_tokens:
                raise ClientInputError(f"the chat is {len(ids)} tokens; this model's prompt context is "
                                       f"{self.max_prompt_tokens} tokens", param="messages")
            return ids
        return encode_prompt(self.tokenizer, prompt)[-self.max_prompt_tokens:]

    def chat_prompt(self, messages: list[dict]) -> ChatPrompt:
        prompt = render_chat(self.tokenizer, messages)
        self.encode(prompt)  # an over-long chat is a 400 before anything is queued or streamed
        return prompt

    def _kwargs(self, p: GenParams, rows: Sequence[GenParams]) -> dict:
        """Greedy decoding for every call; rows that sample draw their token in RowSampler (made
        here, before the engine lock: a seed torch cannot take fails this call only)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        kw = dict(max_new_tokens=p.max_tokens, pad_token_id=self.tokenizer.pad_token_id,
                  eos_token_id=self.tokenizer.eos_token_id, do_sample=False,
                  stopping_criteria=StoppingCriteriaList([CancelCriteria(rows), Progress(self)]))
        if not all(r.greedy for r in rows):
            kw["logits_processor"] = LogitsProcessorList([RowSampler(rows)])
        return kw

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], params: Union[GenParams, Sequence[GenParams]]) -> list[GenResult]:
        """One padded batch for prompts sharing sampling settings (taken from the first row);
        stop strings and cancel flags stay per row."""
        rows = per_row(params, len(prompts))
        ids = [self.encode(p) for p in prompts]
        input_ids, attn = left_pad(ids, self.tokenizer.pad_token_id)
        width = input_ids.shape[1]
        kwargs = self._kwargs(rows[0], rows)
        with self.lock:
            out = self.model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)
        results = []
        for row, x, p in zip(out[:, width:], ids, rows):
            toks, ended = self.completion_tokens(row.tolist())
            text, stopped = apply_stop(self.tokenizer.decode(toks, skip_special_tokens=True), p.stop)
            text = text if stopped else complete_characters(text)
            used = self.tokens_through_stop(toks, p.stop) if stopped else len(toks)
            results.append(GenResult(text, "stop" if ended or stopped else "length", len(x), used))
        return results

    def try_probe(self) -> bool:
        """One greedy token if the engine is free now (True); False at once if it is busy: the health
        check never queues behind the requests it is checking."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            ids = torch.tensor([self.encode("ok")])
            with torch.no_grad():
                self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                    do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            self.steps += 1
            return True
        finally:
            self.lock.release()

    def tokens_through_stop(self, generated: list[int], stop: Optional[list[str]]) -> int:
        """How many generated ids it took to complete the first stop string: the count vLLM reports
        for an answer a stop string cut, and the same for a stream and a whole answer (the whole
        answer generates past the stop, a stream stops shortly after it)."""
        for k in range(1, len(generated) + 1):
            if apply_stop(self.tokenizer.decode(generated[:k], skip_special_tokens=True), stop)[1]:
                return k
        return len(generated)

    def completion_tokens(self, generated: list[int]) -> tuple[list[int], bool]:
        """A row's generated ids up to its EOS (or without the padding of a row that ended early
        in a batch), and whether it reached EOS."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if eos in generated:
            return generated[:generated.index(eos)], True
        return [t for t in generated if t != pad], False

    def stream(self, prompt: str, params: GenParams) -> Iterator[Union[str, StreamEnd]]:
        """Text deltas as they are generated (TextIteratorStreamer fed by a worker thread), then a
        StreamEnd with the finish reason and the token counts `generate` gives the same request.

        A failure in the worker ends the stream and is raised here; a worker that stalls raises
        TimeoutError after `stream_timeout_s`; closing this iterator cancels the generation."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=self.stream_timeout_s)
        ids = torch.tensor([self.encode(prompt)])
        params.cancel = params.cancel or threading.Event()
        failure: list[BaseException] = []
        generated: list[list[int]] = []

        def run():
            try:
                kwargs = self._kwargs(params, [params])
                with torch.no_grad(), self.lock:
                    out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                              **kwargs)
                    generated.append(out[0, ids.shape[1]:].tolist())
            except BaseException as e:  # handed to the consumer below, never lost in the thread
                failure.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            cut_by_stop = yield from visible_deltas(streamer, params.stop)
        except queue.Empty:
            raise TimeoutError(f"no token for {self.stream_timeout_s}s") from None
        finally:
            params.cancel.set()
            thread.join(timeout=self.stream_timeout_s)
        if failure:
            raise failure[0]
        toks, ended = self.completion_tokens(generated[0] if generated else [])
        used = self.tokens_through_stop(toks, params.stop) if cut_by_stop else len(toks)
        yield StreamEnd("stop" if ended or cut_by_stop else "length", ids.shape[1], used)

