"""Fair turns for one shared variant: the queue alone, then through a real worker (issue 8)."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import EMBEDDED_GGUF, collect, variant

from playground.config import parse_config
from playground.errors import ConfigError
from playground.request_queue import FairQueue, Queued


def admitted(turn) -> bool:
    """Step a turn once: True when it got its slot, else the Queued it yielded."""
    try:
        return next(turn)
    except StopIteration as done:
        return done.value


def test_a_burst_from_one_session_does_not_hold_back_another():
    line = FairQueue(slots=1)
    assert admitted(line.turn("a")) is True  # a's first request runs
    a2, a3 = line.turn("a"), line.turn("a")
    assert admitted(a2) == Queued(position=1, running=1)
    assert admitted(a3) == Queued(position=2, running=1)
    b1 = line.turn("b")
    # b's first request goes before a's third: one request per session per round.
    assert admitted(b1) == Queued(position=2, running=1)
    assert admitted(a3) == Queued(position=3, running=1)
    line.release()
    assert admitted(a2) is True
    assert admitted(b1) == Queued(position=1, running=1)
    line.release()
    assert admitted(b1) is True
    line.release()
    assert admitted(a3) is True
    line.release()
    assert line.snapshot() == (0, 0)


def test_a_cancelled_or_abandoned_wait_gives_its_place_up():
    line = FairQueue(slots=1)
    assert admitted(line.turn("a")) is True
    cancel = threading.Event()
    waiting, abandoned, last = line.turn("b", cancel), line.turn("c"), line.turn("d")
    assert admitted(waiting).position == 1
    assert admitted(abandoned).position == 2
    assert admitted(last).position == 3
    cancel.set()
    assert admitted(waiting) is False  # no slot held: nothing to release
    abandoned.close()
    assert line.snapshot() == (1, 1)
    assert admitted(last) == Queued(position=1, running=1)
    line.release()
    assert admitted(last) is True


def test_slots_admit_that_many_at_once():
    line = FairQueue(slots=2)
    assert admitted(line.turn("a")) is True
    assert admitted(line.turn("a")) is True
    assert admitted(line.turn("b")) == Queued(position=1, running=2)
    with pytest.raises(ValueError):
        FairQueue(slots=0)


def test_concurrency_above_one_is_for_servers_only():
    with pytest.raises(ConfigError, match="concurrency above 1 needs the openai backend"):
        parse_config(
            {"id": "x", "display_name": "x", "backend": "llamacpp", "source": {"path": "m.gguf"}, "concurrency": 2},
            origin="x.yaml",
        )
    with pytest.raises(ConfigError, match="concurrency"):
        parse_config(
            {
                "id": "x",
                "display_name": "x",
                "backend": "openai",
                "endpoint": {"base_url": "http://h/v1"},
                "concurrency": 0,
            },
            origin="x.yaml",
        )


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sessions_take_turns_on_a_real_worker(engine):
    """Three requests wait while the slot is taken; they are answered a, b, a, each seeing its
    place in line, and every reply is whole."""
    config = engine.catalogue.add(variant(id="shared", backend="llamacpp", source={"path": str(EMBEDDED_GGUF)}))
    engine.load(config.id)
    worker = engine.workers[config.id]
    holder = worker.turns.turn("someone else")
    assert admitted(holder) is True  # as if another session's reply were streaming
    order: list[str] = []
    seen: dict[str, list[int]] = {}
    replies: dict[str, object] = {}

    def ask(name: str, session: str) -> None:
        request = engine.request(config.id, prompt=f"Say {name}.", mode="chat", max_new_tokens=6, temperature=0)

        def events():
            for event in engine.generate(config.id, request, session=session):
                if isinstance(event, Queued):
                    seen.setdefault(name, []).append(event.position)
                elif not order or order[-1] != name:
                    order.append(name)
                yield event

        replies[name] = collect(events())

    threads = []
    for name, session in [("a2", "a"), ("a3", "a"), ("b1", "b")]:
        threads.append(threading.Thread(target=ask, args=(name, session)))
        threads[-1].start()
        _wait_for(lambda name=name: name in seen)  # queued before the next one arrives
    assert worker.turns.snapshot() == (1, 3)
    _wait_for(lambda: seen["a3"][-1] == 3)  # b1 went ahead of it
    worker.turns.release()
    for thread in threads:
        thread.join(60)
    assert order == ["a2", "b1", "a3"]
    assert seen["a2"][0] == 1 and seen["b1"][0] == 2 and seen["a3"][:2] == [2, 3]
    for name in order:
        started, deltas, finished = replies[name]
        assert finished is not None and finished.text == "".join(d.text for d in deltas)
        assert finished.metrics.completion_tokens >= 1
    assert worker.turns.snapshot() == (0, 0)


def test_a_stop_while_queued_ends_the_reply_at_once(engine):
    config = engine.catalogue.add(variant(id="shared-stop", backend="llamacpp", source={"path": str(EMBEDDED_GGUF)}))
    engine.load(config.id)
    worker = engine.workers[config.id]
    assert admitted(worker.turns.turn("someone else")) is True
    cancel = threading.Event()
    events = engine.generate(config.id, engine.request(config.id, prompt="Hi", mode="chat"), cancel, session="me")
    assert next(events) == Queued(position=1, running=1)
    cancel.set()
    rest = list(events)
    assert len(rest) == 1 and rest[0].metrics.finish_reason == "cancelled" and rest[0].text == ""
    assert worker.turns.snapshot() == (1, 0)  # only the holder's slot


def test_a_server_variant_streams_as_many_requests_at_once_as_its_concurrency(engine, server):
    """With concurrency 2 both requests are sent to the server before either ends (the parent
    queue holds none back); with 1 the second starts only after the first finished."""
    for slots in (1, 2):
        config = engine.catalogue.add(
            variant(id=f"server-{slots}", backend="openai", endpoint={"base_url": server}, concurrency=slots)
        )
        engine.load(config.id)
        marks: list[tuple[str, str]] = []

        def ask(name: str, config_id: str = config.id, marks: list[tuple[str, str]] = marks) -> None:
            request = engine.request(config_id, prompt="Count to ten.", mode="chat", max_new_tokens=16, temperature=0)
            for event in engine.generate(config_id, request, session=name):
                kind = type(event).__name__
                if kind in ("Started", "Finished"):
                    marks.append((name, kind))

        threads = [threading.Thread(target=ask, args=(name,)) for name in ("x", "y")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        kinds = [kind for _, kind in marks]
        assert sorted(kinds) == ["Finished", "Finished", "Started", "Started"]
        if slots == 1:
            assert kinds == ["Started", "Finished", "Started", "Finished"]
        else:
            assert kinds[:2] == ["Started", "Started"]
        engine.unload(config.id)
