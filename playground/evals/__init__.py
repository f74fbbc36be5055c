"""Evaluations of one variant through the engine, so each works on every backend that can do
what it needs (scoring, generation); each is run as a background job (playground.jobs.kinds)."""
