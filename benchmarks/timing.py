"""The interleaved runner: every competitor of a case, round-robin, in one process.

A *round* runs each competitor once. After ``warmup`` rounds (the first one pays JAX's trace
and compile), ``reps`` timed rounds run every competitor once each, so slow drifts of a shared
machine (another job, frequency changes) hit every competitor alike. The order within a round is
shuffled every round (seeded; two competitors simply alternate): with the order rotating by one,
as it did before, every competitor always ran right after the same one, and whatever a call
leaves behind biases the next. Measured: torch's OpenMP workers keep spinning after torch's
2-thread call (libgomp's active wait), so on a loaded 2-core machine the competitor that always
came after the torch rows was timed 1.3-1.5x slower than its twin in the same rounds; swapping
the two swapped the verdict, and ``OMP_WAIT_POLICY=passive`` removed the effect (README,
Caveats). Per round the ratio of two competitors' times is a *paired* ratio; the
reported ratio is the median of those, steadier than the ratio of the medians on a noisy box.

Two escape hatches keep a run bounded when one competitor is far slower than the rest:

* *slow*: a competitor whose first warm-up call takes longer than ``Schedule.slow_s`` leaves the
  rounds; it is timed ``slow_reps`` times on its own afterwards (*unpaired*: its ratio is a
  ratio of medians, not a median of paired ratios).
* *skipped*: the caller may exclude competitors up front (see ``cli.pilot``: a short-sequence
  pilot predicts the full call above ``Schedule.skip_s``); they are reported as estimates.
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class Competitor:
    """One contender of a case.

    ``fn()`` runs the work once and returns only when it is done (JAX results are blocked on
    with ``jax.block_until_ready``; torch on CPU is synchronous). ``before``/``after`` run
    around each call, outside the timed region (e.g. switching torch's thread count).
    """

    name: str
    framework: str  # "torch" or "jax"
    fn: Callable[[], Any]
    before: Optional[Callable[[], None]] = None
    after: Optional[Callable[[], None]] = None
    note: str = ""


@dataclass
class Schedule:
    """How many rounds: ``warmup``, then timed rounds chosen so the case takes about
    ``budget_s`` (estimated from the last warm-up round), clamped to [min_reps, max_reps].
    ``slow_s``/``slow_reps``/``skip_s``: the escape hatches above; ``pilot_steps``: the
    pilot's sequence length as a fraction of T (None: no pilot)."""

    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 30
    budget_s: float = 20.0
    slow_s: float = math.inf
    slow_reps: int = 2
    skip_s: float = math.inf
    pilot_fraction: Optional[float] = None
    seed: int = 0  # of the per-round shuffle

    def reps_for(self, round_s: float) -> int:
        if round_s <= 0:
            return self.max_reps
        return max(self.min_reps, min(self.max_reps, int(math.ceil(self.budget_s / round_s))))


@dataclass
class CaseTimes:
    names: list[str]
    times: dict[str, list[float]]  # seconds, one entry per timed call
    warmup_times: dict[str, list[float]]  # seconds, every warm-up call (first: + compile)
    errors: dict[str, str] = field(default_factory=dict)
    reps: int = 0
    unpaired: list[str] = field(default_factory=list)  # timed on their own (slow)
    orders: list[list[str]] = field(default_factory=list)  # the timed rounds' call order

    def median(self, name: str) -> Optional[float]:
        t = self.times.get(name)
        return statistics.median(t) if t else None

    def paired_ratios(self, num: str, den: str) -> list[float]:
        if num in self.unpaired or den in self.unpaired:
            return []
        a, b = self.times.get(num), self.times.get(den)
        if not a or not b:
            return []
        return [x / y for x, y in zip(a, b)]

    def paired_ratio_of_ratios(self, a: str, b: str, c: str, d: str) -> list[float]:
        """Per round ``(a / b) / (c / d)``: e.g. (GRU JAX / GRU torch) / (LSTM JAX / LSTM
        torch), all four timed in the same round; empty if any of them is unpaired."""
        if any(n in self.unpaired for n in (a, b, c, d)):
            return []
        ts = [self.times.get(n) for n in (a, b, c, d)]
        if not all(ts):
            return []
        return [(w / x) / (y / z) for w, x, y, z in zip(*ts)]

    def ratio(self, num: str, den: str) -> Optional[float]:
        """Median of the paired ratios; a ratio of medians when either side is unpaired."""
        if num in self.unpaired or den in self.unpaired:
            a, b = self.median(num), self.median(den)
            return a / b if a and b else None
        r = self.paired_ratios(num, den)
        return statistics.median(r) if r else None


def _call(c: Competitor) -> float:
    if c.before is not None:
        c.before()
    try:
        t0 = time.perf_counter()
        c.fn()
        return time.perf_counter() - t0
    finally:
        if c.after is not None:
            c.after()


def round_orders(n: int, reps: int, seed: int = 0) -> list[list[int]]:
    """The order of the ``n`` competitors in each of ``reps`` rounds: alternating for two,
    a seeded shuffle per round otherwise (so no competitor always follows the same one)."""
    if n <= 2:
        return [list(range(n)) if r % 2 == 0 else list(range(n))[::-1] for r in range(reps)]
    rng = random.Random(seed)
    orders = []
    for _ in range(reps):
        order = list(range(n))
        rng.shuffle(order)
        orders.append(order)
    return orders


def run_interleaved(competitors: list[Competitor], schedule: Schedule, log=print,
                    exclude: frozenset[str] = frozenset(),
                    protect: frozenset[str] = frozenset()) -> CaseTimes:
    """Warm-up rounds, then timed round-robin rounds; then the slow ones alone.

    A competitor that raises is dropped (its error kept) and the others go on; competitors
    named in ``exclude`` are not run at all; those in ``protect`` (the references of the
    ratios) are never moved out of the rounds for being slow.
    """
    live = [c for c in competitors if c.name not in exclude]
    errors: dict[str, str] = {}
    warm: dict[str, list[float]] = {c.name: [] for c in competitors}
    slow: list[Competitor] = []

    def guarded(c: Competitor) -> Optional[float]:
        try:
            return _call(c)
        except Exception as e:  # noqa: BLE001 - one broken competitor must not end the run
            errors[c.name] = f"{type(e).__name__}: {e}"
            log(f"    ! {c.name} failed: {errors[c.name]}")
            log("".join(traceback.format_exception(e)[-3:]))
            live.remove(c)
            return None

    last_round = 0.0
    for w in range(max(1, schedule.warmup)):
        last_round = 0.0
        for c in list(live):
            t = guarded(c)
            if t is None:
                continue
            warm[c.name].append(t)
            if w == 0 and t > schedule.slow_s and c.name not in protect:
                log(f"    {c.name}: {t:.1f} s > {schedule.slow_s} s, timed on its own")
                live.remove(c)
                slow.append(c)
            else:
                last_round += t
    reps = schedule.reps_for(last_round)

    times: dict[str, list[float]] = {c.name: [] for c in live + slow}
    orders = round_orders(len(live), reps, schedule.seed)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for order in orders:
            for i in order:
                c = live[i]
                times[c.name].append(_call(c))
        for c in slow:
            for _ in range(schedule.slow_reps):
                times[c.name].append(_call(c))
    finally:
        if gc_was_enabled:
            gc.enable()
    return CaseTimes(
        names=[c.name for c in competitors],
        times=times,
        warmup_times=warm,
        errors=errors,
        reps=reps,
        unpaired=[c.name for c in slow],
        orders=[[live[i].name for i in order] for order in orders],
    )
