"""The job process: `python -m playground.jobs.run STORE JOB_ID`. Runs one job and records its
progress, result or error in the store itself, so the record holds even if nobody watches."""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

from playground.catalogue import Catalogue
from playground.errors import PlaygroundError
from playground.jobs.kinds import JobContext, job_kind, validate_options
from playground.jobs.store import JobStore


def main(store_path: str, job_id: str) -> int:
    store = JobStore(Path(store_path))
    job = store.get(job_id)
    jobs_root = Path(store_path).parent
    store.update(job_id, state="running", pid=os.getpid(), started=time.time())
    try:
        catalogue = Catalogue.from_settings(made_dir=jobs_root / "model_configs")
        ctx = JobContext(job_id, jobs_root / job_id, catalogue, lambda event: store.add_event(job_id, event))
        record = job_kind(job.kind)
        result = record.runner(validate_options(job.kind, job.options), ctx)
    except PlaygroundError as err:
        store.add_event(job_id, {"message": f"failed: {err}"})
        store.update(job_id, state="failed", error=str(err), ended=time.time())
        return 1
    except OSError as err:  # a full disk, a folder it may not write: the reason, in one line
        where = f" ({err.filename})" if err.filename else ""
        store.add_event(job_id, {"message": traceback.format_exc(limit=5)})
        store.update(job_id, state="failed", error=f"{err.strerror or err}{where}", ended=time.time())
        return 1
    except Exception as err:  # the job's log keeps the traceback; the record keeps one line
        store.add_event(job_id, {"message": traceback.format_exc(limit=5)})
        store.update(job_id, state="failed", error=f"{err.__class__.__name__}: {err}", ended=time.time())
        return 1
    store.update(job_id, state="succeeded", result=result, ended=time.time())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
