"""The Blind tab: two loaded variants behind "Model A" and "Model B"; vote, then see who was who.

Votes go to SQLite with both answers and the prompt's category (playground.arena); the
leaderboard shows Bradley–Terry ratings with bootstrap intervals, with or without style control,
for all votes or one category, the pairwise win rates, and which neighbours are not separated
yet (playground.ratings). Votes export and import as JSON or CSV, so sessions can be merged.
Metrics are held back until the vote, since speed alone can give a variant away.
"""

from __future__ import annotations

import html
import math
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from playground.arena import VoteStore
from playground.engine import Engine
from playground.errors import PlaygroundError
from playground.ratings import CONFIDENCE, Leaderboard, win_rates
from playground.ui.formatting import error_text, ordinal
from playground.ui.live import LivePage, VariantView
from playground.ui.session import Session, Sessions
from playground.ui.streaming import PanelRun, stream_panels

OUTCOME_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
ALL_TAGS = "all categories"


def leaderboard_markdown(board: Leaderboard) -> str:
    if not board.ratings:
        return "No votes yet."

    def bound(value: float) -> str:
        return "?" if not math.isfinite(value) else f"{value:.0f}"

    lines = [
        f"| # | variant | rating | {CONFIDENCE:.0%} interval | votes | wins | losses | ties | both bad |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rank, r in enumerate(board.ratings, start=1):
        lines.append(
            f"| {rank} | {r.variant} | {r.rating:.0f} | {bound(r.low)} – {bound(r.high)} | {r.votes} | {r.wins} | "
            f"{r.losses} | {r.ties} | {r.both_bad} |"
        )
    return "\n".join(lines)


def board_notes(board: Leaderboard) -> str:
    if not board.ratings:
        return ""
    said = [
        f"{board.method} over {board.votes} vote{'s' if board.votes != 1 else ''}; ratings on the Elo scale "
        f"(+100 ≈ wins 64% of the time), {CONFIDENCE:.0%} intervals by bootstrap; one virtual tie between every two "
        "variants keeps ratings finite while votes are few."
    ]
    if board.style_coefficients:
        effects = ", ".join(f"{k.replace('_', ' ')} {v:+.0f}" for k, v in board.style_coefficients.items())
        said.append(f"Style effects (rating points per standard deviation of the A − B difference): {effects}.")
    said += [f"⚠ {note}" for note in board.notes]
    return "\n\n".join(said)


def win_rate_markdown(votes: list[Any]) -> str:
    """Row's share of points against column (a tie half), with the votes behind each cell."""
    variants, rates, games = win_rates(votes)
    if not variants:
        return ""
    lines = ["| wins of ↓ against → | " + " | ".join(variants) + " |", "| --- |" + " ---: |" * len(variants)]
    for i, row in enumerate(variants):
        cells = [
            "–" if i == j or games[i, j] == 0 else f"{rates[i, j]:.0%} ({int(games[i, j])})"
            for j in range(len(variants))
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class ArenaTab:
    def __init__(self, engine: Engine, sessions: Sessions, votes: VoteStore) -> None:
        self.engine = engine
        self.sessions = sessions
        self.votes = votes
        self._lock = threading.Lock()
        self._version_at = -1.0
        self._version_seen: tuple[int, int] = (0, 0)
        self._tags_seen: list[str] = []
        self._board_lock = threading.Lock()
        self._boards: dict[Any, tuple[str, str, str]] = {}

    def build(self) -> None:
        gr.Markdown("Two loaded variants answer the same prompt under hidden names. Vote, then the names show.")
        new_pair = gr.Button("New pair", elem_id="arena-new")
        self.pool = gr.Markdown(elem_id="arena-pool")
        self.info = gr.Markdown(elem_id="arena-info")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Model A")
                chat_a = gr.Chatbot(
                    height=280, show_label=False, elem_id="arena-a", feedback_options=None, buttons=["copy"]
                )
            with gr.Column():
                gr.Markdown("### Model B")
                chat_b = gr.Chatbot(
                    height=280, show_label=False, elem_id="arena-b", feedback_options=None, buttons=["copy"]
                )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", elem_id="arena-prompt", scale=3)
            tag = gr.Dropdown(
                self.votes.tags(), value=None, allow_custom_value=True, label="category (pick or type; optional)",
                elem_id="arena-tag", scale=1,
            )
            session_name = gr.Textbox(
                label="demo session (kept with each vote)", elem_id="arena-session", scale=1,
                value=time.strftime("session %Y-%m-%d"),
            )
        send = gr.Button("Send to both", variant="primary", elem_id="arena-send")
        with gr.Row():
            buttons = {
                k: gr.Button(label, elem_id=f"vote-{k}", interactive=False) for k, label in OUTCOME_LABELS.items()
            }
        self.reveal = gr.Markdown(elem_id="arena-reveal")
        gr.Markdown("### Leaderboard")
        with gr.Row():
            self.board_tag = gr.Dropdown(
                [ALL_TAGS, *self.votes.tags()], value=ALL_TAGS, label="category", elem_id="leaderboard-tag"
            )
            style = gr.Checkbox(
                False, label="style control (length, headers, lists, bold as covariates)", elem_id="style-control"
            )
        self.board = gr.Markdown("Computing…", elem_id="leaderboard")  # the live part fills it
        self.notes = gr.Markdown(elem_id="leaderboard-notes")
        gr.Markdown("#### Pairwise win rates")
        self.win_rates = gr.Markdown(elem_id="winrate")
        with gr.Row():
            export = gr.Button("Export votes (JSON, CSV)", elem_id="votes-export")
            import_button = gr.UploadButton(
                "Import votes (JSON or CSV)", file_types=[".json", ".csv"], elem_id="votes-import"
            )
        files = gr.File(label="vote exports", file_count="multiple", elem_id="votes-files", visible=False)
        votes_status = gr.Markdown(elem_id="votes-status")

        vote_buttons = list(buttons.values())
        board_outputs = [self.board, self.notes, self.win_rates]
        new_pair.click(self.new_pair, None, [self.info, chat_a, chat_b, self.reveal, *vote_buttons])
        send.click(self.ask, [prompt, tag], [self.info, chat_a, chat_b, *vote_buttons], show_progress="hidden")
        for outcome, button in buttons.items():
            button.click(self._voter(outcome), session_name, [self.reveal, *board_outputs, *vote_buttons])
        self.board_tag.change(self.pick_tag, self.board_tag, board_outputs)
        style.change(self.pick_style, style, board_outputs)
        export.click(self.export, None, files)
        import_button.upload(self.import_votes, import_button, votes_status).then(
            self.pick_style, style, board_outputs
        )
        self.tag = tag

    def follow_live(self, live: LivePage) -> None:
        """The pool of ready variants, and a pair drawn as soon as two are ready."""

        def render(session: Session, views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            ready = [v for v, view in views.items() if view.state == "ready"]
            if session.arena_pair is None and len(ready) >= 2:
                self._draw(session, ready)
            pair = session.arena_pair
            if pair is None:
                line = f"{len(ready)} variant(s) ready: load at least two (Compare tab) for a blind round."
            elif any(views[v].state != "ready" for v in pair if v in views):
                line = "⚠ One side of this pair is no longer ready: press New pair."
            else:
                line = f"A hidden pair of the {len(ready)} ready variants is waiting for your prompt."
            return [(line, line)]

        live.add([self.pool], render)

        # Votes cast on other pages (a demo session's other laptops) reach this board and its
        # category lists within a second; this page's own votes and imports update it at once.
        def board(session: Session, _views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            key = (self._version(), session.board_tag, session.board_style)
            return [(key, lambda i=i: self._board_views(session)[i]) for i in range(3)]

        live.add([self.board, self.notes, self.win_rates], board)

        def tags(_session: Session, _views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            known = tuple(self._tags())
            return [(known, gr.update(choices=list(known))), (known, gr.update(choices=[ALL_TAGS, *known]))]

        live.add([self.tag, self.board_tag], tags)

    # -- the leaderboard ----------------------------------------------------------------------
    def _version(self) -> tuple[int, int]:
        """The votes' version, read at most every 0.4 s however many pages look."""
        with self._lock:
            if time.monotonic() - self._version_at > 0.4:
                self._version_seen = self.votes.version()
                self._tags_seen = self.votes.tags()
                self._version_at = time.monotonic()
            return self._version_seen

    def _tags(self) -> list[str]:
        self._version()
        return self._tags_seen

    def _board_views(self, session: Session) -> tuple[str, str, str]:
        """(table, notes, win rates) for the session's category and style choice, computed once
        per version of the votes and shared by every page that shows the same choice."""
        key = (self._version(), session.board_tag, session.board_style)
        with self._board_lock:
            if key not in self._boards:
                votes = self.votes.votes(session.board_tag or None)
                board = self.votes.leaderboard(session.board_tag or None, style=session.board_style)
                if session.board_tag:
                    board.notes.insert(0, f"Only votes tagged {session.board_tag!r}.")
                self._boards = {k: v for k, v in self._boards.items() if k[0] == key[0]}  # this version's only
                self._boards[key] = (leaderboard_markdown(board), board_notes(board), win_rate_markdown(votes))
            return self._boards[key]

    def pick_tag(self, tag: str | None, request: gr.Request) -> tuple[str, str, str]:
        session = self.sessions.get(request)
        session.board_tag = "" if not tag or tag == ALL_TAGS else tag
        return self._board_views(session)

    def pick_style(self, style: bool, request: gr.Request) -> tuple[str, str, str]:
        session = self.sessions.get(request)
        session.board_style = bool(style)
        return self._board_views(session)

    def export(self) -> Any:
        folder = Path(tempfile.mkdtemp(prefix="votes-"))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (folder / f"votes-{stamp}.json").write_text(self.votes.export_json(), encoding="utf-8")
        (folder / f"votes-{stamp}.csv").write_text(self.votes.export_csv(), encoding="utf-8")
        return gr.update(value=[str(folder / f"votes-{stamp}.{ext}") for ext in ("json", "csv")], visible=True)

    def import_votes(self, file: Any) -> str:
        if file is None:
            return ""
        path = Path(file if isinstance(file, str) else file.name)
        shown = getattr(file, "orig_name", None) or path.name
        try:
            added, known = self.votes.import_file(path)
        except PlaygroundError as err:
            return error_text(PlaygroundError(str(err).replace(path.name, shown)))
        return (
            f"Imported {added} vote{'s' if added != 1 else ''} from {html.escape(shown)}"
            + (f"; {known} already here were skipped." if known else ".")
        )

    @staticmethod
    def _draw(session: Session, ready: list[str]) -> None:
        pair = random.sample(ready, 2)
        session.arena_pair, session.arena_voted, session.arena_prompt = (pair[0], pair[1]), False, ""

    def new_pair(self, request: gr.Request) -> list[Any]:
        """Two ready variants drawn at random. A round still being answered is stopped first
        and waited for, so its answers cannot come back over the new pair's empty chats (or
        offer a vote on the old answers)."""
        session = self.sessions.get(request)
        session.arena_round += 1
        for cancel in session.arena_cancels:
            cancel.set()
        session.arena_idle.wait(timeout=30)
        ready = [v for v, w in list(self.engine.workers.items()) if w.state == "ready"]
        off = [gr.update(interactive=False)] * len(OUTCOME_LABELS)
        if len(ready) < 2:
            session.arena_pair = None
            return ["⚠ Load at least two variants (Compare tab) for a blind round.", [], [], "", *off]
        self._draw(session, ready)
        return ["A new pair is ready: send a prompt.", [], [], "", *off]

    def ask(self, prompt: str, tag: str | None, request: gr.Request) -> Iterator[list[Any]]:
        session = self.sessions.get(request)
        off = [gr.update(interactive=False)] * len(OUTCOME_LABELS)
        if session.arena_pair is None:
            yield ["⚠ Load at least two variants (Compare tab), then press New pair.", gr.update(), gr.update(), *off]
            return
        if not prompt or not prompt.strip():
            yield ["⚠ Type a prompt first.", gr.update(), gr.update(), *off]
            return
        if not session.arena_idle.is_set():
            yield ["⚠ Still answering the last prompt: wait for both answers, or press New pair.", gr.update(), gr.update(), *off]
            return
        session.arena_idle.clear()
        try:
            yield from self._answer(session, prompt, tag)
        finally:
            session.arena_idle.set()

    def _answer(self, session: Session, prompt: str, tag: str | None) -> Iterator[list[Any]]:
        off = [gr.update(interactive=False)] * len(OUTCOME_LABELS)
        # A stopped round's last frame changes nothing: Gradio sends an event's last frame
        # again, whole, with its end message (blocks.py, handle_streaming_diffs), and that came
        # after New pair's frame in the browser tests, drawing the round's answers back.
        unchanged = [gr.update()] * (3 + len(OUTCOME_LABELS))
        round_drawn = session.arena_round
        session.arena_cancels = [threading.Event(), threading.Event()]
        try:
            runs = [
                PanelRun(
                    i,
                    variant,
                    self.engine.request(variant, prompt=prompt, mode="chat"),
                    session.arena_cancels[i],
                    session=session.key,
                )
                for i, variant in enumerate(session.arena_pair)
            ]
        except Exception as err:
            yield [error_text(err), gr.update(), gr.update(), *off]
            return
        session.arena_prompt, session.arena_voted, session.arena_tag = prompt, False, (tag or "").strip()[:60]
        session.arena_answers = ("", "")
        snapshot: list[PanelRun] = []
        for snapshot in stream_panels(self.engine, runs):
            if session.arena_round != round_drawn:  # New pair stopped this round: its page is the new pair's
                yield unchanged
                return
            views = [
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": r.text or "…"}] for r in snapshot
            ]
            waiting = [r.queue_position for r in snapshot if r.status == "queued"]
            note = f" (waiting its turn: {ordinal(min(waiting))} in line)" if waiting else ""  # which side stays hidden
            yield [f"Answering…{note}", *views, *off]
        if session.arena_round != round_drawn:
            yield unchanged
            return
        failed = [r for r in snapshot if r.status == "failed"]
        views = [
            [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": r.text if r.status != "failed" else f"⚠ {r.error}"},
            ]
            for r in snapshot
        ]
        if failed:
            yield ["⚠ One side failed: no vote for this round. Press New pair.", *views, *off]
            return
        session.arena_answers = (snapshot[0].text, snapshot[1].text)
        on = [gr.update(interactive=True)] * len(OUTCOME_LABELS)
        yield ["Both answered. Which is better?", *views, *on]

    def _voter(self, outcome: str):
        def vote(session_name: str, request: gr.Request) -> list[Any]:
            session = self.sessions.get(request)
            off = [gr.update(interactive=False)] * len(OUTCOME_LABELS)
            if session.arena_pair is None or session.arena_voted or not session.arena_prompt:
                return ["⚠ Nothing to vote on: start a new pair.", gr.update(), gr.update(), gr.update(), *off]
            a, b = session.arena_pair
            answer_a, answer_b = session.arena_answers
            self.votes.record(
                a, b, outcome, session.arena_prompt, answer_a=answer_a, answer_b=answer_b, tag=session.arena_tag,
                session=(session_name or "").strip()[:80],
            )
            session.arena_voted = True
            reveal = (
                f"You voted **{OUTCOME_LABELS[outcome]}**. Model A was **{self.engine.catalogue.configs[a].display_name}**, "
                f"Model B was **{self.engine.catalogue.configs[b].display_name}**."
            )
            self._version_at = -1.0  # read the votes again at the next look
            return [reveal, *self._board_views(session), *off]

        return vote
