"""Background jobs (fine-tunes, evals): each in its own process, recorded in SQLite.

The job process writes its own events and result to the store; the manager starts queued jobs
as resources allow, watches the processes, and records deaths (a SIGKILL shows as failed). The
UI and CLI only read the store and ask the manager; no job ever runs in the UI process.
"""
