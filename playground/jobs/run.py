"""The job process: `python -m playground.jobs.run STORE JOB_ID`. Runs one job and records its
progress, result or error in the store itself, so the record holds even if nobody watches."""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

from playground.errors import PlaygroundError
from playground.jobs.kinds import KINDS, validate_options
from playground.jobs.store import JobStore


def main(store_path: str, job_id: str) -> int:
    store = JobStore(Path(store_path))
    job = store.get(job_id)
    os.environ["PLAYGROUND_JOB_ID"] = job_id
    os.environ["PLAYGROUND_JOBS_DIR"] = str(Path(store_path).parent)
    store.update(job_id, state="running", pid=os.getpid(), started=time.time())
    try:
        options = validate_options(job.kind, job.options)
        result = KINDS[job.kind][1](options, lambda event: store.add_event(job_id, event))
    except PlaygroundError as err:
        store.add_event(job_id, {"message": f"failed: {err}"})
        store.update(job_id, state="failed", error=str(err), ended=time.time())
        return 1
    except Exception as err:  # the job's log keeps the traceback; the record keeps one line
        store.add_event(job_id, {"message": traceback.format_exc(limit=5)})
        store.update(job_id, state="failed", error=f"{err.__class__.__name__}: {err}", ended=time.time())
        return 1
    store.update(job_id, state="succeeded", result=result, ended=time.time())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
