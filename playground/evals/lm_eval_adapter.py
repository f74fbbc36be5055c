"""lm-evaluation-harness on any variant the engine can score: an `LM` whose requests go to the
variant's worker (loglikelihood via pair_logprobs, rolling via text_logprobs, generate_until
via the worker's own generation), so transformers, scratch_gpt and GGUF variants all work.

Tasks are the harness's own (they need their datasets, so a network) or YAML tasks in a folder
(`include_path`), e.g. the bundled assets/evals/lm_eval_tiny, which reads local JSON.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM

from playground.config import REPO_ROOT
from playground.engine import Engine
from playground.errors import PlaygroundError
from playground.workers import Finished, TextDelta

TINY_TASKS = REPO_ROOT / "assets" / "evals" / "lm_eval_tiny"


class PlaygroundLM(LM):
    def __init__(self, engine: Engine, variant_id: str, progress: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.engine, self.variant_id, self.progress = engine, variant_id, progress
        self.context = engine.context_length(variant_id)
        self.done = 0

    def _tick(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, continuation = request.args
            logprob, greedy = self.engine.pair_logprobs(self.variant_id, context, continuation)
            out.append((logprob, bool(greedy)))
            self._tick()
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            logprobs = self.engine.text_logprobs(self.variant_id, text, self.context, self.context // 2)
            out.append(float(sum(logprobs)))
            self._tick()
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = self.engine.request(
                self.variant_id,
                prompt=context,
                mode="completion",
                temperature=float(gen_kwargs.get("temperature", 0.0)),
                max_new_tokens=int(gen_kwargs.get("max_gen_toks", 256)),
            )
            text = ""
            for event in self.engine.generate(self.variant_id, prompt):
                if isinstance(event, TextDelta):
                    text += event.text
                    if any(stop in text for stop in until):
                        break  # leaving the stream stops the worker's generation
                elif isinstance(event, Finished):
                    text = event.text
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
            self._tick()
        return out


def _task_folder(include_path: str | None, work: Path) -> str | None:
    """The task folder to give the harness; the bundled one is copied with its data path filled in."""
    if include_path is None:
        return None
    if include_path != "tiny":
        if not Path(include_path).is_dir():
            raise PlaygroundError(f"task folder {include_path} does not exist")
        return include_path
    folder = work / "lm_eval_tiny"
    shutil.copytree(TINY_TASKS, folder, dirs_exist_ok=True)
    for yaml_file in folder.glob("*.yaml"):
        yaml_file.write_text(yaml_file.read_text().replace("{data_dir}", str(folder)))
    return str(folder)


def run_lm_eval(
    engine: Engine,
    variant_id: str,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="lm-eval-") as work:
        folder = _task_folder(include_path, Path(work))
        manager = TaskManager(include_path=folder) if folder else TaskManager()
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise PlaygroundError(
                f"lm-eval knows no task {', '.join(unknown)}" + (f" (in {folder} or built in)" if folder else "")
            )
        try:
            output = lm_eval.simple_evaluate(
                model=PlaygroundLM(engine, variant_id, progress),
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=False,
            )
        except (ConnectionError, OSError) as err:
            raise PlaygroundError(
                f"lm-eval could not load a task's data ({err.__class__.__name__}: {err}); offline, use local tasks"
            ) from None
    return {"results": _plain(output["results"]), "versions": _plain(output.get("versions", {}))}


def _plain(value: Any) -> Any:
    """JSON-ready copy (the harness returns numpy floats and the odd 'N/A')."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value
