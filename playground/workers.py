"""One process per loaded variant, so a crash, an OOM or a hang stays inside it, and unloading
really returns its memory to the system.

Parent and worker talk over two one-way pipes, in the frozen dataclasses of playground.protocol:
commands go down (generate, a typed call, stop, ping, shutdown); events come up (ready or load
failed, then per request: started, delta..., done; a call's value; failed; pongs). A ping is
answered by the worker's reader thread, so a worker stopped or stuck while idle shows as hung.
The worker runs requests one at a time, in order (a server backend with `concurrency` above 1:
that many at once, one thread each); which generation request is sent when is decided in the
parent by the variant's fair queue (request_queue). A reader thread in it applies Stop at once.
The parent's reader thread routes events to the request they belong to, and notices the
worker's death (EOF on the pipe) and tells every waiting request why.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

import psutil

from playground.backends.base import FinishReason, LoadInfo, Request, ScoredToken, StreamEnd
from playground.config import GenerationParams, ModelConfig
from playground.errors import GenerationError, LoadError, WorkerDied, WorkerHung
from playground.metrics import GenerationMetrics
from playground.protocol import (
    Call,
    Command,
    Delta,
    Died,
    Done,
    Failed,
    Generate,
    LoadFailed,
    LoadProgress,
    Ping,
    Pong,
    Ready,
    RequestStarted,
    Shutdown,
    Stop,
    Value,
    WorkerEvent,
)
from playground.request_queue import FairQueue, Queued

# spawn, not fork: the parent may hold threads (UI server) and must never share CUDA state.
_CTX = multiprocessing.get_context("spawn")

WorkerState = Literal["loading", "ready", "failed", "dead", "hung", "unloaded"]
HEARTBEAT_S = 1.0  # how often the parent asks a ready worker whether it is alive


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
    prompt_ids: tuple[int, ...] | None = None  # where the backend has them (the token view)
    token_ids: tuple[int, ...] | None = None
    scored: tuple[ScoredToken, ...] | None = None  # a server's own token probabilities


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


def _run_request(backend: Any, info: LoadInfo, job: Generate, stop: threading.Event, events: _LockedSender) -> None:
    from playground.metrics import GenerationTimer, PeakRssSampler, repetition_warning

    timer = GenerationTimer()
    prompt = backend.prepare(job.request)
    params = fit_to_context(prompt.n_tokens, job.request.params, info.context_length)
    events.send(RequestStarted(job.rid, prompt.n_tokens))
    backend.reset_memory_peaks()
    pieces: list[str] = []
    end: StreamEnd | None = None
    with PeakRssSampler() as rss:
        for item in backend.stream(prompt, params, stop.is_set):
            if isinstance(item, StreamEnd):
                end = item
                continue
            timer.on_tokens(item.n_tokens)
            pieces.append(item.text)
            events.send(Delta(job.rid, item.text, item.n_tokens))
    if end is None:
        raise GenerationError(f"the {backend.name} backend ended its stream without saying why")
    text = "".join(pieces)
    warnings = []
    if backend.config.warn_greedy and params.temperature == 0:
        warnings.append("greedy decoding: this model's card says it loops; use temperature >= 0.7 with top-k")
    if not backend.caps.counts_tokens_locally and end.completion_tokens is None:
        warnings.append("the server reported no token usage: completion tokens are counted from streamed chunks")
    if end.prompt_tokens is None and prompt.n_tokens is None:
        warnings.append(
            "prompt tokens unknown: the server reported none and the config names no tokenizer "
            "(tokenizer.path), so prefill tok/s is not measured"
        )
    if loop := repetition_warning(text):
        warnings.append(loop)
    metrics = timer.finish(
        prompt_tokens=end.prompt_tokens if end.prompt_tokens is not None else prompt.n_tokens,
        completion_tokens=end.completion_tokens,
        backend=info.backend,
        device=info.device,
        finish_reason="cancelled" if stop.is_set() else end.finish_reason,
        peak_rss_bytes=rss.peak,
        device_memory=backend.device_memory(),
        warnings=warnings,
    ).with_speculation(end.speculation)
    prompt_ids = tuple(prompt.payload) if isinstance(prompt.payload, list) else None
    events.send(Done(job.rid, text, metrics, prompt_ids, end.token_ids, end.scored))


def worker_main(
    config: ModelConfig,
    commands: Connection,
    events_pipe: Connection,
    gpu: int | None = None,
    draft: ModelConfig | None = None,
) -> None:
    """Entry point of a worker process: load, then serve requests until shutdown or EOF. With
    `gpu`, the process sees that GPU only (numbered as nvml numbers them), as `cuda`. `draft`:
    the config of the draft model a speculative variant loads beside it."""
    if gpu is not None:  # before anything here initializes CUDA
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        config = config.model_copy(update={"device": "cuda"})
    from playground.backends import create_backend
    from playground.errors import PlaygroundError

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the parent
    events = _LockedSender(events_pipe)  # requests may stream from threads
    try:
        backend = create_backend(config)
        backend.report_download = _download_reporter(events)
        backend.draft_config = draft
        info = backend.load()
    except PlaygroundError as err:
        events.send(LoadFailed(str(err)))
        return
    except MemoryError:
        events.send(LoadFailed("out of memory while loading the weights"))
        return
    except Exception as err:  # any other failure still reaches the user as one line
        events.send(LoadFailed(f"unexpected {err.__class__.__name__} while loading: {err}"))
        return
    if gpu is not None and info.device == "cuda":
        info.notes.append(f"placed on GPU {gpu}")
    events.send(Ready(info))

    pending: queue.Queue[Generate | Call | None] = queue.Queue()
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
            if isinstance(command, Ping):  # answered here, so a main loop stuck on a request shows
                events.send(Pong(command.seq, events.busy_for()), progress=False)
            elif isinstance(command, Stop):
                stop_flag(command.rid).set()
            elif isinstance(command, Shutdown):
                pending.put(None)
                return
            else:
                stop_flag(command.rid)
                pending.put(command)

    threading.Thread(target=read_commands, name="commands", daemon=True).start()

    def serve(job: Generate | Call) -> None:
        events.begin()
        try:
            if isinstance(job, Generate):
                _run_request(backend, info, job, stop_flag(job.rid), events)
            else:
                started = time.perf_counter()
                value = job.run(backend)
                events.send(Value(job.rid, value, time.perf_counter() - started))
        except PlaygroundError as err:
            events.send(Failed(job.rid, str(err)))
        except MemoryError:
            events.send(Failed(job.rid, "out of memory while generating"))
        except Exception as err:
            events.send(Failed(job.rid, f"unexpected {err.__class__.__name__}: {err}"))
        finally:
            events.end()
            with stops_lock:
                stops.pop(job.rid, None)

    together = config.concurrency if backend.caps.serves_concurrently else 1
    pool = ThreadPoolExecutor(together, thread_name_prefix="request") if together > 1 else None
    while (job := pending.get()) is not None:
        if pool is not None and isinstance(job, Generate):
            pool.submit(serve, job)
        else:
            serve(job)
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    backend.unload()


def _download_reporter(events: _LockedSender, every_s: float = 0.25) -> Callable[[int, int | None], None]:
    """Sends a download's byte counts up as LoadProgress, at most every `every_s` (the hub
    client reports each chunk) and always once it is complete."""
    last = [0.0]

    def report(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or (total is not None and done >= total):
            last[0] = now
            events.send(LoadProgress(done, total))

    return report


class _LockedSender:
    """A Connection's send for several threads: one message at a time on the pipe. It also
    keeps how long the requests being served have gone without sending anything (a pong
    carries it, so the parent sees a request stuck before its first token)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()
        self._active = 0
        self._last_progress = time.monotonic()

    def send(self, message: Any, progress: bool = True) -> None:
        with self._lock:
            self._connection.send(message)
            if progress:
                self._last_progress = time.monotonic()

    def begin(self) -> None:
        with self._lock:
            self._active += 1
            self._last_progress = time.monotonic()

    def end(self) -> None:
        with self._lock:
            self._active -= 1

    def busy_for(self) -> float | None:
        """Seconds since a request being served last sent anything; None when idle."""
        with self._lock:
            return time.monotonic() - self._last_progress if self._active else None


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

    def __init__(
        self,
        config: ModelConfig,
        *,
        stall_timeout_s: float = 300.0,
        silent_after_s: float = 10.0,
        gpu: int | None = None,
        draft: ModelConfig | None = None,
    ) -> None:
        self.config = config
        self.gpu = gpu  # the GPU its process sees (nvml's index), where the engine placed it on one
        # A request that sends nothing for this long is stuck (a deadlock, a runaway prefill).
        self.stall_timeout_s = stall_timeout_s
        # A worker that answers no heartbeat for this long has stopped (SIGSTOP, the GIL held).
        self.silent_after_s = silent_after_s
        self._state: WorkerState = "loading"
        self.info: LoadInfo | None = None
        self.error: str | None = None
        self.download: LoadProgress | None = None  # the weights' download, while there is one
        self.started_at = time.monotonic()
        self._unloading = False
        self.hung = False  # set once a request stalled: only unloading ends such a worker
        self._silent_since: float | None = None  # set while heartbeats go unanswered
        self._last_pong = time.monotonic()
        self._ready = threading.Event()
        self._queues: dict[str, queue.Queue[WorkerEvent | Died]] = {}
        self._lock = threading.Lock()
        self.turns = FairQueue(config.concurrency)  # generation requests wait here for a slot
        commands_r, self._commands = _CTX.Pipe(duplex=False)
        self._events, events_w = _CTX.Pipe(duplex=False)
        self.process = _CTX.Process(
            target=worker_main,
            args=(config, commands_r, events_w, gpu, draft),
            name=f"worker-{config.id}",
            daemon=True,
        )
        self.process.start()
        # The child holds its own copies; closing ours lets EOF signal the child's death.
        commands_r.close()
        events_w.close()
        self._reader = threading.Thread(target=self._read_events, name=f"events-{config.id}", daemon=True)
        self._reader.start()
        threading.Thread(target=self._heartbeat, name=f"heartbeat-{config.id}", daemon=True).start()

    @property
    def state(self) -> WorkerState:
        """loading, ready, failed, dead, unloaded; "hung" while a ready worker answers no
        heartbeat or a request in it has stalled."""
        if self._state == "ready" and (self.hung or self._silent_since is not None):
            return "hung"
        return self._state

    def _heartbeat(self) -> None:
        seq = 0
        while not self._ready.wait(HEARTBEAT_S):
            pass
        while self._state == "ready" and not self._unloading:
            seq += 1
            self._send(Ping(seq), quiet=True)
            time.sleep(HEARTBEAT_S)
            silent = time.monotonic() - self._last_pong
            if silent > self.silent_after_s and self._state == "ready":
                if self._silent_since is None:
                    self._silent_since = self._last_pong
                    self.error = (
                        f"{self.config.display_name} stopped answering: no heartbeat for {silent:.0f} s "
                        "(stopped or deadlocked; unload it to end the process)"
                    )

    def _on_pong(self, busy_for: float | None) -> None:
        self._last_pong = time.monotonic()
        if self._silent_since is not None:  # it answers again (SIGCONT): no longer hung
            self._silent_since = None
            self.error = None
        if busy_for is not None and busy_for > self.stall_timeout_s and not self.hung:
            self.hung = True
            self.error = (
                f"{self.config.display_name} produced nothing for {busy_for:.0f} s on a request: "
                "its worker may be hung (unload it to end the process)"
            )

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
            if isinstance(event, Ready):
                self._last_pong = time.monotonic()
                self.info, self._state = event.info, "ready"
                self._ready.set()
            elif isinstance(event, LoadFailed):
                self.error, self._state = event.error, "failed"
                self._ready.set()
            elif isinstance(event, LoadProgress):
                self.download = event
            elif isinstance(event, Pong):
                self._on_pong(event.busy_for)
            else:
                with self._lock:
                    target = self._queues.get(event.rid)
                if target is not None:
                    target.put(event)
        # EOF: the process has ended (or is ending). Find out how, and tell everyone waiting.
        self.process.join(timeout=5)
        if self._state in ("loading", "ready") and not self._unloading:
            self.error = f"the worker of {self.config.display_name} {describe_exit(self.process.exitcode)}"
            self._state = "dead"
        self._ready.set()
        with self._lock:
            waiting = list(self._queues.values())
        for target in waiting:
            target.put(Died(self.error or "the worker ended"))

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
        state = self.state
        if state == "hung":
            raise WorkerHung(self.error or f"{self.config.display_name} is hung")
        if state != "ready":
            raise GenerationError(self.error or f"{self.config.display_name} is not loaded ({state})")

    def _raise_if_unwell(self) -> None:
        """While a request waits: end it at once when its worker is known hung or gone (a
        death before the request was registered reaches it only this way)."""
        state = self.state
        if state == "hung":
            raise WorkerHung(self.error or f"{self.config.display_name} is hung")
        if state != "ready":
            raise WorkerDied(self.error or "the worker ended")

    def _new_request(self) -> tuple[str, queue.Queue[WorkerEvent | Died]]:
        """A request id and the inbox its events are routed to (the caller removes it)."""
        self._check_ready()
        rid = uuid.uuid4().hex
        inbox: queue.Queue[WorkerEvent | Died] = queue.Queue()
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
        text, n_tokens = "", 0
        try:
            self._send(Generate(rid, request))
            cancel_sent = False
            while True:
                if cancel is not None and cancel.is_set() and not cancel_sent:
                    self.stop(rid)
                    cancel_sent = True
                try:
                    event = inbox.get(timeout=0.1)
                except queue.Empty:
                    if self._unloading:  # the stream ends as "unloaded", with what it had
                        finished = True
                        yield Finished(text, self._cut_by_unload(n_tokens))
                        return
                    self._raise_if_unwell()
                    continue
                if isinstance(event, RequestStarted):
                    yield Started(event.prompt_tokens)
                elif isinstance(event, Delta):
                    text, n_tokens = text + event.text, n_tokens + event.n_tokens
                    yield TextDelta(event.text, event.n_tokens)
                elif isinstance(event, Done):
                    finished = True
                    metrics = event.metrics
                    if self._unloading and metrics.finish_reason == "cancelled":
                        metrics = dataclasses.replace(metrics, finish_reason="unloaded")
                    yield Finished(event.text, metrics, event.prompt_ids, event.token_ids, event.scored)
                    return
                elif isinstance(event, Failed):
                    finished = True
                    raise GenerationError(event.message)
                elif isinstance(event, Died):
                    finished = True
                    if self._unloading:
                        yield Finished(text, self._cut_by_unload(n_tokens))
                        return
                    raise WorkerDied(event.message)
        finally:
            if not finished:
                self.stop(rid)
            with self._lock:
                self._queues.pop(rid, None)

    def _cut_by_unload(self, n_tokens: int) -> GenerationMetrics:
        return dataclasses.replace(self._nothing_generated("unloaded"), completion_tokens=n_tokens)

    def ask(self, call: Callable[[str], Call], timeout_s: float | None = None) -> tuple[Any, float]:
        """Run one typed call (protocol.Call, built from the request id it is given) in the
        worker, behind any request already sent: its value and the seconds the worker took."""
        rid, inbox = self._new_request()
        try:
            self._send(call(rid))
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while True:
                try:
                    event = inbox.get(timeout=0.1)
                    break
                except queue.Empty:
                    self._raise_if_unwell()
                    if deadline is not None and time.monotonic() > deadline:
                        raise WorkerHung(f"{self.config.display_name} gave no answer in {timeout_s:.0f} s") from None
            if isinstance(event, Value):
                return event.value, event.seconds
            if isinstance(event, Died):
                raise WorkerDied(event.message)
            if isinstance(event, Failed):
                raise GenerationError(event.message)
            raise GenerationError(f"{self.config.display_name} answered a call with {type(event).__name__}")
        finally:
            with self._lock:
                self._queues.pop(rid, None)

    def stop(self, rid: str | None = None) -> None:
        """Stop one request, or every request of this worker (queued ones too)."""
        with self._lock:
            targets = [rid] if rid else list(self._queues)
        for target in targets:
            self._send(Stop(target), quiet=True)

    def _send(self, command: Command, quiet: bool = False) -> None:
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
        hung = self.state == "hung"  # a stopped or stuck worker is not asked politely
        self._unloading = True
        if self.process.is_alive() and not hung:
            self.stop()
            self._send(Shutdown(), quiet=True)
            self.process.join(timeout_s)
        if self.process.is_alive() and not hung:
            self.process.terminate()
            self.process.join(3)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(3)
        self._state = "unloaded"
        self._reader.join(timeout=5)
        self._commands.close()
