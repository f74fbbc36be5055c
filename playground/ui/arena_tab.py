"""The Blind tab: two loaded variants behind "Model A" and "Model B"; vote, then see who was who.

Votes go to SQLite (playground.arena) and the leaderboard shows Elo-style ratings. Metrics are
held back until the vote, since speed alone can give a variant away.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr

from playground.arena import VoteStore
from playground.engine import Engine
from playground.ui.formatting import error_text, leaderboard_markdown, ordinal
from playground.ui.live import LivePage, VariantView
from playground.ui.session import Session, Sessions
from playground.ui.streaming import PanelRun, stream_panels

OUTCOME_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}


class ArenaTab:
    def __init__(self, engine: Engine, sessions: Sessions, votes: VoteStore) -> None:
        self.engine = engine
        self.sessions = sessions
        self.votes = votes

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
        prompt = gr.Textbox(label="Prompt", elem_id="arena-prompt")
        send = gr.Button("Send to both", variant="primary", elem_id="arena-send")
        with gr.Row():
            buttons = {
                k: gr.Button(label, elem_id=f"vote-{k}", interactive=False) for k, label in OUTCOME_LABELS.items()
            }
        self.reveal = gr.Markdown(elem_id="arena-reveal")
        self.board = gr.Markdown(leaderboard_markdown(self.votes.leaderboard()), elem_id="leaderboard")

        vote_buttons = list(buttons.values())
        new_pair.click(self.new_pair, None, [self.info, chat_a, chat_b, self.reveal, *vote_buttons])
        send.click(self.ask, prompt, [self.info, chat_a, chat_b, *vote_buttons])
        for outcome, button in buttons.items():
            button.click(self._voter(outcome), None, [self.reveal, self.board, *vote_buttons])

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

    @staticmethod
    def _draw(session: Session, ready: list[str]) -> None:
        pair = random.sample(ready, 2)
        session.arena_pair, session.arena_voted, session.arena_prompt = (pair[0], pair[1]), False, ""

    def new_pair(self, request: gr.Request) -> list[Any]:
        session = self.sessions.get(request)
        ready = [v for v, w in list(self.engine.workers.items()) if w.state == "ready"]
        off = [gr.update(interactive=False)] * len(OUTCOME_LABELS)
        if len(ready) < 2:
            session.arena_pair = None
            return ["⚠ Load at least two variants (Compare tab) for a blind round.", [], [], "", *off]
        self._draw(session, ready)
        return ["A new pair is ready: send a prompt.", [], [], "", *off]

    def ask(self, prompt: str, request: gr.Request) -> Iterator[list[Any]]:
        session = self.sessions.get(request)
        off = [gr.update(interactive=False)] * len(OUTCOME_LABELS)
        if session.arena_pair is None:
            yield ["⚠ Load at least two variants (Compare tab), then press New pair.", gr.update(), gr.update(), *off]
            return
        if not prompt or not prompt.strip():
            yield ["⚠ Type a prompt first.", gr.update(), gr.update(), *off]
            return
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
        session.arena_prompt, session.arena_voted = prompt, False
        snapshot: list[PanelRun] = []
        for snapshot in stream_panels(self.engine, runs):
            views = [
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": r.text or "…"}] for r in snapshot
            ]
            waiting = [r.queue_position for r in snapshot if r.status == "queued"]
            note = f" (waiting its turn: {ordinal(min(waiting))} in line)" if waiting else ""  # which side stays hidden
            yield [f"Answering…{note}", *views, *off]
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
        on = [gr.update(interactive=True)] * len(OUTCOME_LABELS)
        yield ["Both answered. Which is better?", *views, *on]

    def _voter(self, outcome: str):
        def vote(request: gr.Request) -> list[Any]:
            session = self.sessions.get(request)
            off = [gr.update(interactive=False)] * len(OUTCOME_LABELS)
            if session.arena_pair is None or session.arena_voted or not session.arena_prompt:
                return ["⚠ Nothing to vote on: start a new pair.", gr.update(), *off]
            a, b = session.arena_pair
            self.votes.record(a, b, outcome, session.arena_prompt)
            session.arena_voted = True
            reveal = (
                f"You voted **{OUTCOME_LABELS[outcome]}**. Model A was **{self.engine.catalogue.configs[a].display_name}**, "
                f"Model B was **{self.engine.catalogue.configs[b].display_name}**."
            )
            return [reveal, leaderboard_markdown(self.votes.leaderboard()), *off]

        return vote
