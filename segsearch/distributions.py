"""One distribution of a space file in Optuna's short form: checked, normalised and listed."""

from __future__ import annotations

import math
from typing import Any

from segcore.errors import UserError

DIST_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


def number(value: Any, where: str, kind: str) -> float | int:
    """A finite int or float from the YAML (`kind`), or an error naming `where`."""
    if isinstance(value, str) and looks_numeric(value):  # PyYAML reads 1e-4 (no dot) as a str
        raise UserError(f"{where}: {value!r} is a string to YAML; write it with a dot, e.g. 1.0e-4")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "int":
        ok = ok and float(value).is_integer()
    if not ok:
        raise UserError(f"{where}: must be a finite {kind} number, got {value!r}")
    return int(value) if kind == "int" else float(value)


def check_dist(spec: Any, where: str) -> dict[str, Any]:
    """One distribution in short form -> normalised dict; checks keys, types and ranges."""
    if not isinstance(spec, dict) or spec.get("type") not in DIST_KEYS:
        raise UserError(f"{where}: must be {{type: float|int|categorical, ...}}")
    kind = spec["type"]
    extra = sorted(set(spec) - DIST_KEYS[kind])
    if extra:
        raise UserError(f"{where}: unknown key '{extra[0]}' for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}.choices: must be a non-empty list")
        for c in choices:
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise UserError(f"{where}.choices: must hold plain values, got {c!r}")
            if isinstance(c, str) and looks_numeric(c):
                number(c, f"{where}.choices", "float")
        return {"type": kind, "choices": list(choices)}
    for key in ("low", "high"):
        if key not in spec:
            raise UserError(f"{where}: needs '{key}'")
    low, high = (number(spec[k], f"{where}.{k}", kind) for k in ("low", "high"))
    if low > high:
        raise UserError(f"{where}: low ({low}) must not exceed high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}.log: must be true or false, got {log!r}")
    if log and low <= 0:
        raise UserError(f"{where}: log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = number(step, f"{where}.step", kind)
        if step <= 0:
            raise UserError(f"{where}.step: must be above 0, got {step}")
        if log:
            raise UserError(f"{where}: step and log cannot be used together")
    if kind == "int" and step is None:
        step = 1
    return {"type": kind, "low": low, "high": high, "log": log, "step": step}


def looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def grid(spec: dict[str, Any]) -> list[Any]:
    """The values a distribution can take, for constraint checks (ends only for floats and for
    integer ranges too long to list)."""
    if spec["type"] == "categorical":
        return spec["choices"]
    if spec["type"] == "int":
        values = range(spec["low"], spec["high"] + 1, spec["step"])
        return list(values) if len(values) <= 10_000 else [values[0], values[-1]]
    return [spec["low"], spec["high"]]
