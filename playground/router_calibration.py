"""Calibration of a router's P(escalate): fitted on in-distribution data (Platt scaling or
isotonic regression, scikit-learn), stored with the router variant, applied to its scores.

A router's raw P(escalate) ranks requests (its AUROC) but need not be an honest probability
(its reliability diagram and ECE say how far off it is). A calibration maps raw to calibrated
scores; the decision, the threshold and every metric then use the calibrated score. The
calibrated scores of the calibration data are kept too, so a threshold for a target escalation
rate can be read off them without running the router again.

Stored as JSON in `<data dir>/router_calibration/<variant id>.json`: the variant's own folder
of configs may be read-only (the bundled ones), and the file is the app's own data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from playground.config import describe_errors
from playground.errors import ConfigError
from playground.paths import data_dir

Method = Literal["platt", "isotonic"]
EPS = 1e-6  # raw scores are clipped into (0, 1) before their log-odds are taken


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variant: str
    method: Method
    data: str  # the data it was fitted on
    n: int = Field(ge=2)
    fitted_at: float
    # Platt: calibrated = σ(a · logit(raw) + b).
    a: float | None = None
    b: float | None = None
    # Isotonic: calibrated = the non-decreasing step function through (x, y), linearly joined.
    x: list[float] = []
    y: list[float] = []
    calibrated_scores: list[float] = []  # of the calibration data, for target-rate thresholds
    ece_before: float | None = None  # on the calibration data (in-sample)
    ece_after: float | None = None

    def apply(self, raw: float | np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(raw, dtype=float), EPS, 1 - EPS)
        if self.method == "platt":
            assert self.a is not None and self.b is not None
            return 1.0 / (1.0 + np.exp(-(self.a * np.log(p / (1 - p)) + self.b)))
        return np.interp(p, self.x, self.y)

    def describe(self) -> str:
        return f"{self.method} on {self.data} ({self.n} rows)"


def fit_calibration(
    variant: str, raw: list[float], escalates: list[bool], method: Method, data: str
) -> Calibration:
    """The calibration of `raw` scores against the gold routes (both classes must occur)."""
    scores = np.clip(np.asarray(raw, dtype=float), EPS, 1 - EPS)
    gold = np.asarray(escalates, dtype=bool)
    if len(scores) < 2 or gold.all() or not gold.any():
        raise ConfigError(f"calibration needs rows of both routes; {data} gives {int(gold.sum())} of {len(gold)} escalating")
    fields: dict = {}
    if method == "platt":
        model = LogisticRegression(C=1e6, max_iter=1000)
        model.fit(np.log(scores / (1 - scores)).reshape(-1, 1), gold)
        fields = {"a": float(model.coef_[0][0]), "b": float(model.intercept_[0])}
    else:
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, gold.astype(float))
        fields = {"x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_]}
    calibration = Calibration(variant=variant, method=method, data=data, n=len(scores), fitted_at=time.time(), **fields)
    calibration.calibrated_scores = [float(v) for v in calibration.apply(scores)]
    return calibration


def calibration_path(variant: str) -> Path:
    return data_dir() / "router_calibration" / f"{variant}.json"


def save_calibration(calibration: Calibration) -> Path:
    path = calibration_path(calibration.variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(calibration.model_dump_json(indent=1))
    temporary.replace(path)  # whole or not at all: a router never reads half a file
    return path


def load_calibration(variant: str) -> Calibration | None:
    """The stored calibration of `variant`, None if it has none; a damaged file is named."""
    path = calibration_path(variant)
    if not path.exists():
        return None
    try:
        calibration = Calibration.model_validate(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"the router calibration {path} cannot be read ({err}); fit it again or delete it") from None
    except ValidationError as err:
        raise ConfigError(f"the router calibration {path} is not valid: {describe_errors(err)}") from None
    if calibration.variant != variant:
        raise ConfigError(f"the router calibration {path} is for {calibration.variant}, not {variant}")
    return calibration


def remove_calibration(variant: str) -> bool:
    path = calibration_path(variant)
    if path.exists():
        path.unlink()
        return True
    return False
