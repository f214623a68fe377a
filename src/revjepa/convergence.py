"""Whether an evaluation curve was still rising when training stopped.

Held-out reverse MRR on this task can peak early, dip while the seen facts are memorised, then
rise again, later and higher (grokking); a run stopped during that rise reports where training
stopped, not what the method reaches. `trend` judges one curve (steps, values; higher is
better) from the curve alone:

    still rising  iff  best(late) - best(early) > max(K * noise, MIN_RISE)

- late: the evaluations at steps > LATE_FRACTION of the last step, but at least the last 2 and
  at most all but 2 (both parts need points to compare); early: the rest.
- noise: the evaluation noise of one checkpoint, estimated from the second differences
  d2_i = v[i+1] - 2 v[i] + v[i-1]: for independent noise of std s they have std s * sqrt(6),
  while a linear trend cancels in them exactly and a slowly bending one (the slow phases of a
  grokking curve) nearly; first differences would count a trend that speeds up or slows down
  as noise. Robustly: 1.4826 * MAD(d2) / sqrt(6) (MAD about the median, so that one jump or a
  steady bend does not inflate it).
- The difference is positive only when the curve's best checkpoint lies in the late part, so
  a curve that peaked early (and fell, or has not yet climbed back above its early peak) is
  never flagged; MIN_RISE keeps a noiseless curve's negligible creep from counting.
- Fewer than MIN_POINTS evaluations: never flagged (no noise estimate, no early part).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MIN_POINTS = 4
LATE_FRACTION = 0.75
K = 2.0  # a margin of 2 noise standard deviations (see the module docstring)
MIN_RISE = 0.01  # in the metric's units: a hundredth of MRR


# what the shape adds for the other verdicts
_NOTE = {"flat": "", "fell": " (fell)", "rising again": " (fell, rising again)"}


@dataclass(frozen=True)
class Trend:
    """The judgement of one curve. `verdict`: still rising; flat (the late part reaches the
    best to within twice the threshold); fell (the late part stays below it by more); rising
    again (fell, but the late part is above the dip since the best by more than the threshold:
    climbing back, not yet above the early best); too few (evaluations to judge)."""

    n: int
    rising: bool
    verdict: str
    best_step: int
    best_value: float
    last_step: int
    last_value: float
    noise: float  # nan with fewer than MIN_POINTS evaluations
    threshold: float  # max(K * noise, MIN_RISE); nan likewise
    late_gain: float  # best(late) - best(early); nan likewise

    @property
    def shape(self) -> str:
        """At a glance, e.g. "still rising: best 0.692 at 22k, last 0.67", "best 0.15 at 2k,
        last 0.089 (fell)", "best 0.552 at 16k = last"."""
        text = f"best {self.best_value:.3g} at {short_step(self.best_step)}"
        same = self.best_step == self.last_step
        text += " = last" if same else f", last {self.last_value:.3g}"
        if self.verdict == "still rising":
            return "still rising: " + text
        if self.verdict == "too few":
            return f"{text} ({self.n} evaluation{'s' * (self.n != 1)}: too few to judge)"
        return text + _NOTE[self.verdict]

    def as_dict(self) -> dict[str, Any]:
        """The fields and `shape`, nan as None (strict JSON)."""
        fields = {
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in dataclasses.asdict(self).items()
        }
        return {**fields, "shape": self.shape}


def noise_scale(values: Sequence[float]) -> float:
    """The noise std of one point, from the MAD of the second differences (nan below 3 points)."""
    d2 = [values[i + 1] - 2 * values[i] + values[i - 1] for i in range(1, len(values) - 1)]
    if not d2:
        return math.nan
    centre = statistics.median(d2)
    mad = statistics.median(abs(d - centre) for d in d2)
    return 1.4826 * mad / math.sqrt(6)


def late_start(steps: Sequence[int]) -> int:
    """Index of the first evaluation of the late part (see the module docstring)."""
    n = len(steps)
    first = next(i for i, s in enumerate(steps) if s > LATE_FRACTION * steps[-1])
    return max(2, min(first, n - 2))


def trend(steps: Sequence[int], values: Sequence[float]) -> Trend:
    """Judge the curve `values` at `steps` (one value per step; sorted here by step)."""
    if len(steps) != len(values) or not steps:
        raise ValueError("trend needs one value per step, and at least one")
    pairs = sorted(zip(steps, values))
    steps = [int(s) for s, _ in pairs]
    values = [float(v) for _, v in pairs]
    n = len(values)
    # the earliest of equal values, as report picks its best checkpoint
    best = max(range(n), key=lambda i: (values[i], -steps[i]))
    ends = (steps[best], values[best], steps[-1], values[-1])
    if n < MIN_POINTS:
        return Trend(n, False, "too few", *ends, math.nan, math.nan, math.nan)
    cut = late_start(steps)
    noise = noise_scale(values)
    threshold = max(K * noise, MIN_RISE)
    late_best = max(values[cut:])
    gain = late_best - max(values[:cut])
    if gain > threshold:
        verdict = "still rising"
    # twice the margin to call a fall: on a flat noisy curve the best is the highest of many
    # points, some 2 noise stds above the rest (the rise compares it the other way round)
    elif values[best] - late_best <= 2 * threshold:
        verdict = "flat"
    # the rule again on the curve after its best: the late part above the dip between
    elif late_best - max(values[best + 1 : cut], default=math.inf) > threshold:
        verdict = "rising again"
    else:
        verdict = "fell"
    return Trend(n, verdict == "still rising", verdict, *ends, noise, threshold, gain)


def short_step(step: int) -> str:
    """16000 -> "16k", 2500 -> "2.5k", 800 -> "800"."""
    return f"{step / 1000:g}k" if step >= 1000 else str(step)
