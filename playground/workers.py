"""One process per loaded variant, so a crash, an OOM or a hang stays inside it, and unloading
really returns its memory to the system.

Parent and worker talk over two one-way pipes. Commands go down (generate, stop, shutdown);
events come up (ready / load_failed, then per request: started, chunk..., done or error).
The worker runs requests one at a time, in order (a server backend with `concurrency` above 1:
that many at once, one thread each); which generation request is sent when is decided in the
parent by the variant's fair queue (request_queue). A reader thread in it applies Stop at once.
The parent's reader thread routes events to the request they belong to, and notices the
worker's death (EOF on the pipe) and tells every waiting request why.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

import psutil

from playground.backends.base import FinishReason, LoadInfo, Request
from playground.config import GenerationParams, ModelConfig
from playground.errors import GenerationError, LoadError, WorkerDied, WorkerHung
from playground.metrics import GenerationMetrics
from playground.request_queue import FairQueue, Queued

# spawn, not fork: the parent may hold threads (UI server) and must never share CUDA state.
_CTX = multiprocessing.get_context("spawn")

WorkerState = Literal["loading", "ready", "failed", "dead", "unloaded"]


# -- events handed to callers ----------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    prompt_tokens: int | None


@dataclass(frozen=True)
class TextDelta:
    text: str
    n_tokens: int


@dataclass(frozen=True)
class Finished:
    text: str
    metrics: GenerationMetrics


Event = Queued | Started | TextDelta | Finished


# -- the worker process ----------------------------------------------------------------------
def fit_to_context(prompt_tokens: int | None, params: GenerationParams, context_length: int) -> GenerationParams:
    """Refuse prompts that fill the context; shorten max_new_tokens to what is left."""
    if prompt_tokens is None:
        return params
    room = context_length - prompt_tokens
    if room <= 0:
        raise GenerationError(
            f"the prompt is {prompt_tokens} tokens, but the context holds {context_length}: shorten it"
        )
    return params if params.max_new_tokens <= room else params.merged(max_new_tokens=room)


def _run_request(
    backend: Any, info: LoadInfo, rid: str, request: Request, stop: threading.Event, events: Connection
) -> None:
    from playground.metrics import GenerationTimer, PeakRssSampler, repetition_warning

    timer = GenerationTimer()
    prompt = backend.prepare(request)
    params = fit_to_context(prompt.n_tokens, request.params, info.context_length)
    events.send(("started", rid, prompt.n_tokens))
    backend.reset_memory_peaks()
    pieces: list[str] = []
    prompt_tokens, completion_tokens = prompt.n_tokens, None
    usage_seen = False
    with PeakRssSampler() as rss:
        for item in backend.stream(prompt, params, stop.is_set):
            if not hasattr(item, "text"):  # a Usage report from the backend itself
                prompt_tokens = item.prompt_tokens if item.prompt_tokens is not None else prompt_tokens
                completion_tokens = item.completion_tokens
                usage_seen = True
                continue
            timer.on_tokens(item.n_tokens)
            pieces.append(item.text)
            events.send(("chunk", rid, item.text, item.n_tokens))
    text = "".join(pieces)
    warnings = []
    if backend.config.warn_greedy and params.temperature == 0:
        warnings.append("greedy decoding: this model's card says it loops; use temperature >= 0.7 with top-k")
    if not backend.counts_tokens_locally and not usage_seen:
        warnings.append("the server reported no token usage: completion tokens are counted from streamed chunks")
    if loop := repetition_warning(text):
        warnings.append(loop)
    metrics = timer.finish(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        backend=info.backend,
        device=info.device,
        finish_reason="cancelled" if stop.is_set() else backend.finish_reason(),
        peak_rss_bytes=rss.peak,
        device_memory=backend.device_memory(),
        warnings=warnings,
    )
    events.send(("done", rid, text, metrics))


def worker_main(config: ModelConfig, commands: Connection, events: Connection) -> None:
    """Entry point of a worker process: load, then serve requests until shutdown or EOF."""
    from playground.backends import create_backend
    from playground.errors import PlaygroundError

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the parent
    events = _LockedSender(events)  # type: ignore[assignment]  # requests may stream from threads
    try:
        backend = create_backend(config)
        info = backend.load()
    except PlaygroundError as err:
        events.send(("load_failed", str(err)))
        return
    except MemoryError:
        events.send(("load_failed", "out of memory while loading the weights"))
        return
    except Exception as err:  # any other failure still reaches the user as one line
        events.send(("load_failed", f"unexpected {err.__class__.__name__} while loading: {err}"))
        return
    events.send(("ready", info))

    pending: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
    stops: dict[str, threading.Event] = {}
    stops_lock = threading.Lock()

    def stop_flag(rid: str) -> threading.Event:
        with stops_lock:
            return stops.setdefault(rid, threading.Event())

    def read_commands() -> None:
        while True:
            try:
                command = commands.recv()
            except (EOFError, OSError):  # the parent is gone: stop everything and leave
                with stops_lock:
                    for flag in stops.values():
                        flag.set()
                pending.put(None)
                return
            kind = command[0]
            if kind in ("generate", "score", "call"):
                stop_flag(command[1])
                pending.put(command)
            elif kind == "stop":
                stop_flag(command[1]).set()
            elif kind == "shutdown":
                pending.put(None)
                return

    threading.Thread(target=read_commands, name="commands", daemon=True).start()

    def serve(job: tuple[Any, ...]) -> None:
        kind, rid, request = job[0], job[1], job[2]
        try:
            if kind == "generate":
                _run_request(backend, info, rid, request, stop_flag(rid), events)
            elif kind == "call":  # request is the method's name here, job[3] its arguments
                if request not in CALLABLE:
                    raise GenerationError(f"a worker does not run {request!r}")
                started = time.perf_counter()
                value = getattr(backend, request)(*job[3])
                events.send(("scored", rid, value, time.perf_counter() - started))
            else:
                started = time.perf_counter()
                values = backend.score(request, job[3])
                events.send(("scored", rid, values, time.perf_counter() - started))
        except PlaygroundError as err:
            events.send(("error", rid, str(err)))
        except MemoryError:
            events.send(("error", rid, "out of memory while generating"))
        except Exception as err:
            events.send(("error", rid, f"unexpected {err.__class__.__name__}: {err}"))
        finally:
            with stops_lock:
                stops.pop(rid, None)

    together = config.concurrency if backend.serves_concurrently else 1
    pool = ThreadPoolExecutor(together, thread_name_prefix="request") if together > 1 else None
    while (job := pending.get()) is not None:
        if pool is not None and job[0] == "generate":
            pool.submit(serve, job)
        else:
            serve(job)
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    backend.unload()


class _LockedSender:
    """A Connection's send for several threads: one message at a time on the pipe."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        with self._lock:
            self._connection.send(message)


# Backend methods a parent may run in a worker by name (see Backend).
CALLABLE = frozenset({"count_tokens", "request_tokens", "text_logprobs", "pair_logprobs"})


# -- the parent's handle ---------------------------------------------------------------------
def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        sig = signal.Signals(-exitcode)
        hint = " (out of memory, or killed by someone)" if sig == signal.SIGKILL else ""
        return f"was killed by {sig.name}{hint}"
    return f"exited with code {exitcode}"


class Worker:
    """The parent's side of one variant's worker process."""

    def __init__(self, config: ModelConfig, *, stall_timeout_s: float = 300.0) -> None:
        self.config = config
        self.stall_timeout_s = stall_timeout_s
        self.state: WorkerState = "loading"
        self.info: LoadInfo | None = None
        self.error: str | None = None
        self.started_at = time.monotonic()
        self._unloading = False
        self.hung = False
        self._ready = threading.Event()
        self._queues: dict[str, queue.Queue[tuple[Any, ...]]] = {}
        self._lock = threading.Lock()
        self.turns = FairQueue(config.concurrency)  # generation requests wait here for a slot
        commands_r, self._commands = _CTX.Pipe(duplex=False)
        self._events, events_w = _CTX.Pipe(duplex=False)
        self.process = _CTX.Process(
            target=worker_main,
            args=(config, commands_r, events_w),
            name=f"worker-{config.id}",
            daemon=True,
        )
        self.process.start()
        # The child holds its own copies; closing ours lets EOF signal the child's death.
        commands_r.close()
        events_w.close()
        self._reader = threading.Thread(target=self._read_events, name=f"events-{config.id}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def rss_bytes(self) -> int | None:
        try:
            return psutil.Process(self.process.pid).memory_info().rss
        except (psutil.Error, TypeError):
            return None

    # -- event routing -------------------------------------------------------------------
    def _read_events(self) -> None:
        while True:
            try:
                event = self._events.recv()
            except (EOFError, OSError):
                break
            kind = event[0]
            if kind == "ready":
                self.info, self.state = event[1], "ready"
                self._ready.set()
            elif kind == "load_failed":
                self.error, self.state = event[1], "failed"
                self._ready.set()
            else:
                with self._lock:
                    target = self._queues.get(event[1])
                if target is not None:
                    target.put(event)
        # EOF: the process has ended (or is ending). Find out how, and tell everyone waiting.
        self.process.join(timeout=5)
        if self.state in ("loading", "ready") and not self._unloading:
            self.error = f"the worker of {self.config.display_name} {describe_exit(self.process.exitcode)}"
            self.state = "dead"
        self._ready.set()
        with self._lock:
            waiting = list(self._queues.values())
        for target in waiting:
            target.put(("died", "", self.error or "the worker ended"))

    # -- loading -------------------------------------------------------------------------
    def settled(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for the load to end, either way; True once it has."""
        return self._ready.wait(timeout_s)

    def wait_ready(self, timeout_s: float | None = None) -> LoadInfo:
        if not self._ready.wait(timeout_s):
            raise LoadError(f"{self.config.display_name} is still loading after {timeout_s:.0f} s")
        if self.state != "ready" or self.info is None:
            raise LoadError(self.error or f"{self.config.display_name} failed to load")
        return self.info

    # -- generation ----------------------------------------------------------------------
    def _check_ready(self) -> None:
        if self.state != "ready":
            raise GenerationError(self.error or f"{self.config.display_name} is not loaded ({self.state})")

    def _new_request(self) -> tuple[str, queue.Queue[tuple[Any, ...]]]:
        """A request id and the inbox its events are routed to (the caller removes it)."""
        self._check_ready()
        rid = uuid.uuid4().hex
        inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        with self._lock:
            self._queues[rid] = inbox
        return rid, inbox

    def generate(
        self, request: Request, cancel: threading.Event | None = None, session: str = "local"
    ) -> Iterator[Event]:
        """Stream one request's events: `Queued` while it waits its turn among the sessions
        using this variant, then the worker's. Closing the iterator early, or setting `cancel`,
        stops it (a queued request too); after a cancel the stream still ends with its Finished
        event."""
        self._check_ready()  # before queueing: a variant that is not loaded gets no place in line
        admitted = yield from self.turns.turn(session, cancel)
        if not admitted:
            yield Finished("", self._nothing_generated("cancelled"))
            return
        try:
            yield from self._generate(request, cancel)
        finally:
            self.turns.release()

    def _nothing_generated(self, reason: FinishReason) -> GenerationMetrics:
        info = self.info
        return GenerationMetrics(
            prompt_tokens=None,
            completion_tokens=0,
            ttft_s=None,
            prefill_tok_s=None,
            decode_tok_s=None,
            decode_s=0.0,
            total_s=0.0,
            peak_mem_bytes=0,
            peak_rss_bytes=0,
            backend=info.backend if info else self.config.backend,
            device=info.device if info else "",
            finish_reason=reason,
        )

    def _generate(self, request: Request, cancel: threading.Event | None) -> Iterator[Event]:
        rid, inbox = self._new_request()
        finished = False
        try:
            self._send(("generate", rid, request))
            started_at: float | None = None
            last_event = time.monotonic()
            cancel_sent = False
            while True:
                if cancel is not None and cancel.is_set() and not cancel_sent:
                    self.stop(rid)
                    cancel_sent = True
                try:
                    event = inbox.get(timeout=0.1)
                except queue.Empty:
                    if self.state != "ready":  # died before this request was registered
                        raise WorkerDied(self.error or "the worker ended") from None
                    # A queued request waits its turn; once started, silence means a hang.
                    if started_at is not None and time.monotonic() - last_event > self.stall_timeout_s:
                        self.hung = True
                        raise WorkerHung(
                            f"{self.config.display_name} produced nothing for {self.stall_timeout_s:.0f} s: "
                            "its worker may be hung (unload it to end the process)"
                        ) from None
                    continue
                last_event = time.monotonic()
                kind = event[0]
                if kind == "started":
                    started_at = last_event
                    yield Started(event[2])
                elif kind == "chunk":
                    yield TextDelta(event[2], event[3])
                elif kind == "done":
                    finished = True
                    yield Finished(event[2], event[3])
                    return
                elif kind == "error":
                    finished = True
                    raise GenerationError(event[2])
                elif kind == "died":
                    finished = True
                    raise WorkerDied(event[2])
        finally:
            if not finished:
                self.stop(rid)
            with self._lock:
                self._queues.pop(rid, None)

    def score(
        self, request: Request, continuations: list[str], timeout_s: float | None = None
    ) -> tuple[list[float], float]:
        """Log-probabilities of each continuation after the request's prompt, and the seconds
        the worker took. Waits its turn behind any generation already queued."""
        return self._ask(("score", request, list(continuations)), timeout_s)

    def call(self, method: str, *args: Any, timeout_s: float | None = None) -> tuple[Any, float]:
        """One of the backend's scoring methods (CALLABLE) run in the worker: its value and the
        seconds it took."""
        return self._ask(("call", method, args), timeout_s)

    def _ask(self, command: tuple[Any, ...], timeout_s: float | None) -> tuple[Any, float]:
        rid, inbox = self._new_request()
        try:
            self._send((command[0], rid, *command[1:]))
            try:
                event = inbox.get(timeout=timeout_s or self.stall_timeout_s)
            except queue.Empty:
                self.hung = True
                raise WorkerHung(f"{self.config.display_name} gave no scores in time: its worker may be hung") from None
            if event[0] == "scored":
                return event[2], event[3]
            if event[0] == "died":
                raise WorkerDied(event[2])
            raise GenerationError(event[2])
        finally:
            with self._lock:
                self._queues.pop(rid, None)

    def stop(self, rid: str | None = None) -> None:
        """Stop one request, or every request of this worker (queued ones too)."""
        with self._lock:
            targets = [rid] if rid else list(self._queues)
        for target in targets:
            self._send(("stop", target), quiet=True)

    def _send(self, command: tuple[Any, ...], quiet: bool = False) -> None:
        try:
            with self._lock:
                self._commands.send(command)
        except (OSError, ValueError):
            if not quiet:
                raise WorkerDied(self.error or f"the worker of {self.config.display_name} is gone") from None

    # -- ending --------------------------------------------------------------------------
    def kill(self) -> None:
        """SIGKILL the process (what the OOM killer does); the reader reports the death."""
        if self.process.is_alive():
            self.process.kill()

    def unload(self, timeout_s: float = 10.0) -> None:
        """End the process: politely first, then by force. Its memory goes back to the system."""
        self._unloading = True
        if self.process.is_alive() and not self.hung:
            self.stop()
            self._send(("shutdown",), quiet=True)
            self.process.join(timeout_s)
        if self.process.is_alive() and not self.hung:
            self.process.terminate()
            self.process.join(3)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(3)
        self.state = "unloaded"
        self._reader.join(timeout=5)
        self._commands.close()
