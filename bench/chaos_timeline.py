"""The upstream's concurrency and the load generator's backlog over time, as one event sweep.

Every upstream request is a +1 at its start and a -1 at its end; every client request is
"waiting" from when it was sent until it started at the upstream (or got its answer, or gave up).
``sweep`` walks those events in time order and hands each constant stretch to the visitors.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bench.chaos_load import ClientRecord
from bench.recording_upstream import UpstreamRecord

# Order of events at one instant: a slot frees before a start takes it; a request is waiting
# when its own start happens, and stops waiting right after.
UP_END, WAIT_BEGIN, UP_START, WAIT_END = range(4)


@dataclass(frozen=True)
class Event:
    t: float
    order: int
    replica: int


@dataclass
class State:
    """The state between two events: upstream requests running (all and per replica), waiting."""

    running: int
    per_replica: list[int]
    waiting: int
    wait_since: float | None  # start of the current stretch with something waiting


def events(
    upstream: Sequence[UpstreamRecord], clients: Sequence[ClientRecord], now: float
) -> list[Event]:
    started = {u.request_id: u.start for u in upstream}
    out: list[Event] = []
    for u in upstream:
        out.append(Event(u.start, UP_START, u.replica))
        out.append(Event(u.end if u.end >= 0 else now, UP_END, u.replica))
    for c in clients:
        stop = c.done if c.done >= 0 else now
        if c.request_id in started:
            stop = min(stop, max(started[c.request_id], c.sent))
        out.append(Event(c.sent, WAIT_BEGIN, c.replica))
        out.append(Event(stop, WAIT_END, c.replica))
    out.sort(key=lambda e: (e.t, e.order))
    return out


class Visitor:
    def on_event(self, event: Event, before: State, after: State) -> None:
        """Called for every event with the state just before and just after it."""

    def on_stretch(self, t0: float, t1: float, state: State) -> None:
        """Called for every stretch [t0, t1) during which ``state`` held."""


def sweep(evs: Sequence[Event], replicas: int, visitors: Iterable[Visitor]) -> None:
    vs = list(visitors)
    state = State(0, [0] * replicas, 0, None)
    for i, e in enumerate(evs):
        before = State(state.running, list(state.per_replica), state.waiting, state.wait_since)
        if e.order == UP_START:
            state.running += 1
            if 0 <= e.replica < replicas:
                state.per_replica[e.replica] += 1
        elif e.order == UP_END:
            state.running -= 1
            if 0 <= e.replica < replicas:
                state.per_replica[e.replica] -= 1
        elif e.order == WAIT_BEGIN:
            if state.waiting == 0:
                state.wait_since = e.t
            state.waiting += 1
        else:
            state.waiting -= 1
            if state.waiting == 0:
                state.wait_since = None
        for v in vs:
            v.on_event(e, before, state)
        t1 = evs[i + 1].t if i + 1 < len(evs) else e.t
        if t1 > e.t:
            for v in vs:
                v.on_stretch(e.t, t1, state)


class Intervals:
    """Disjoint sorted intervals: the measured time minus the fault windows."""

    def __init__(self, start: float, end: float, holes: Iterable[tuple[float, float]]) -> None:
        spans = [(start, end)]
        for h0, h1 in sorted(holes):
            cut: list[tuple[float, float]] = []
            for a, b in spans:
                if h1 <= a or h0 >= b:
                    cut.append((a, b))
                    continue
                if a < h0:
                    cut.append((a, h0))
                if h1 < b:
                    cut.append((h1, b))
            spans = cut
        self.spans = spans
        self._starts = [a for a, _ in spans]

    def pieces(self, t0: float, t1: float) -> list[tuple[int, float]]:
        """(interval index, length) of each part of [t0, t1) inside the intervals."""
        out = []
        i = max(bisect.bisect_right(self._starts, t0) - 1, 0)
        while i < len(self.spans) and self.spans[i][0] < t1:
            a, b = self.spans[i]
            if (length := min(b, t1) - max(a, t0)) > 0:
                out.append((i, length))
            i += 1
        return out

    def contains(self, t0: float, t1: float) -> bool:
        """Whether [t0, t1] lies inside one interval."""
        i = bisect.bisect_right(self._starts, t0) - 1
        return i >= 0 and self.spans[i][1] >= t1

    @property
    def length(self) -> float:
        return sum(b - a for a, b in self.spans)


class Concurrency:
    """Upstream concurrency as change points, to average it over any window."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.values: list[int] = []

    def add(self, t: float, running: int) -> None:
        if self.times and self.times[-1] == t:
            self.values[-1] = running
        else:
            self.times.append(t)
            self.values.append(running)

    def mean(self, t0: float, t1: float) -> float:
        if t1 <= t0:
            return 0.0
        area, t = 0.0, t0
        i = bisect.bisect_right(self.times, t0) - 1  # the last change at or before t0
        while t < t1:
            value = self.values[i] if i >= 0 else 0
            end = min(self.times[i + 1], t1) if i + 1 < len(self.times) else t1
            area += value * (end - t)
            t, i = end, i + 1
        return area / (t1 - t0)
