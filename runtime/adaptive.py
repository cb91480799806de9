"""draft_length="auto": choose each round's k from measured acceptance and measured costs.

A round with k drafts yields E(k) = 1 + sum_{j<k} P(at least j+1 accepted) tokens and costs
k * (one draft step) + (one verify of k+1 tokens) + the rest of the round, measured apart for rounds that
draft and rounds that do not: the host's work (a drafting round's is larger: chains, decisions, the
draft's bookkeeping) and the draft's catch-up on what the round before accepted (a feature draft's is a
draft forward every round). Leaving that out made auto draft at 0.92x the target alone. The controller
picks the k with the most tokens per second, k = 0 (the target alone) included, so speculation never
runs knowingly slower than plain decoding. Costs are running averages; acceptance per position is
counted (hits over tries, older rounds weighing less) plus one pseudo-try at the previous position's rate
(0.5 for the first), so one probe that agrees moves it most of the way and a position never drafted is
expected to do as well as the one before it.
A k whose cost is unknown is tried once, and while k = 0 wins a round still drafts one token now and
then, so a draft that starts agreeing is noticed: after PROBE_EVERY rounds, then twice as many after
each probe that found no agreement (a probe costs a verify and the draft's catch-up), back to
PROBE_EVERY after one that did.
"""

from __future__ import annotations

import numpy as np

from .speculative import RoundStats

PROBE_EVERY = 16
_MAX_PROBE_EVERY = 256
_DECAY = 0.9  # weight of the past in the running averages


class AdaptiveDraftLength:
    def __init__(self, max_k: int):
        self.max_k = max_k
        self.hits = np.zeros(max_k)  # rounds that accepted draft j+1 ...
        self.tries = np.zeros(max_k)  # ... of those that drafted it and accepted the first j
        self.step_cost: float | None = None  # seconds per draft step
        self.verify_cost: dict[int, float] = {}  # k -> seconds of the verify (or decode) forward
        # drafting or not -> seconds of the rest of a round; a catch-up after rounds that did not draft
        # (or over the prompt) is left out: it is the price of a probe
        self.rest_cost: dict[bool, float] = {}
        self._last_k = 0
        self.rounds_at_zero = 0
        self.probe_every = PROBE_EVERY
        self.probing = False

    def choose(self, limit: int) -> int:
        """The k for the next round, at most limit."""
        limit = min(limit, self.max_k)
        if limit == 0:
            return 0
        for k in (0, 1):  # measure the plain step and one draft step before modelling anything
            if k not in self.verify_cost:
                return k
        # tokens a round of k drafts yields on average: 1 + sum over j < k of P(first j+1 accepted)
        expected = np.concatenate([[1.0], 1.0 + np.cumsum(np.cumprod(self.reach()))])
        best = max(range(limit + 1), key=lambda k: expected[k] / self._round_cost(k))
        self.probing = False
        if best == 0:
            self.rounds_at_zero += 1
            if self.rounds_at_zero >= self.probe_every:
                self.rounds_at_zero, self.probing = 0, True
                return 1
        return best

    def _round_cost(self, k: int) -> float:
        return k * (self.step_cost or 0.0) + self._verify_cost(k) + self.rest_cost.get(k > 0, 0.0)

    def reach(self) -> np.ndarray:
        """P(draft j+1 accepted | the first j were), for each position j."""
        rates, prior = [], 0.5
        for hits, tries in zip(self.hits, self.tries):
            prior = (hits + prior) / (tries + 1)
            rates.append(prior)
        return np.array(rates)

    def _verify_cost(self, k: int) -> float:
        if k in self.verify_cost:
            return self.verify_cost[k]
        # Unmeasured: interpolate linearly from the nearest measured k below and above (or the slope
        # between the two largest measured), which overestimates a verify that shares weight reads.
        known = sorted(self.verify_cost)
        lo = max((m for m in known if m < k), default=known[0])
        hi = min((m for m in known if m > k), default=None)
        if hi is None:
            a, b = known[-2], known[-1]
            slope = (self.verify_cost[b] - self.verify_cost[a]) / (b - a)
            return self.verify_cost[b] + slope * (k - b)
        w = (k - lo) / (hi - lo)
        return (1 - w) * self.verify_cost[lo] + w * self.verify_cost[hi]

    def update(self, r: RoundStats) -> None:
        if self.probing:
            self.probe_every = PROBE_EVERY if any(r.accepted) else min(2 * self.probe_every, _MAX_PROBE_EVERY)
        k = max(r.drafted)
        self.verify_cost[k] = _average(self.verify_cost.get(k), r.verify_seconds)
        rest = r.seconds - r.draft_seconds - r.verify_seconds - (0.0 if self._last_k else r.catch_up_seconds)
        self.rest_cost[k > 0], self._last_k = _average(self.rest_cost.get(k > 0), max(rest, 0.0)), k
        if k == 0:
            return
        self.step_cost = _average(self.step_cost, r.draft_seconds / max(r.draft_steps, 1))
        position = np.arange(self.max_k)
        drafted, accepted = np.array(r.drafted)[:, None], np.array(r.accepted)[:, None]
        self.hits = _DECAY * self.hits + (accepted > position).sum(axis=0)
        self.tries = _DECAY * self.tries + ((drafted > position) & (accepted >= position)).sum(axis=0)


def _average(old: float | None, new: float) -> float:
    return new if old is None else _DECAY * old + (1 - _DECAY) * new
