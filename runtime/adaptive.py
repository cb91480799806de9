"""draft_length="auto": choose each round's k from measured acceptance and measured round costs.

Everything is counted per k *offered* to the proposer, not per draft it made: a chain that ChainStop
ends early, or an n-gram lookup that finds less, is part of what offering k yields and costs (counting
only the positions drafted took a cut chain for a sure one). A round offered k yields
E(k) = 1 + sum_{j<k} P(at least j+1 accepted) tokens and takes the seconds measured for rounds offered
k: the draft, the verify and the host's work around them (leaving the host's share out made auto draft
at 0.92x the target alone), less the draft's catch-up on tokens no drafting round committed (the
prompt, the rounds that did not draft: Sequence.settled), the price of a probe; counted in, it made
probes look slow and auto settle on the target alone where k = 1 ran faster. The controller picks the
measured k with the most tokens per second, k = 0 (the target alone) included, so speculation never
runs knowingly slower than plain decoding; where drafting pays, the next longer k is tried once so that
its cost is measured, not guessed. Costs are running averages, in which one sample counts at most
twice the average (a round slowed by a pause of the process must not hand the rounds to a useless
draft). Acceptance per position is counted (hits over tries, older rounds weighing less) plus one
pseudo-try at the previous position's rate (0.5 for the first), so one probe that agrees moves it
most of the way and a position never offered is expected to do as well as the one before it.
k = 0 and k = 1 are measured first, alternately, FIRST_SAMPLES rounds each, and a k's first
FIRST_SAMPLES rounds count alike (their mean starts its running average): decided on one round of each,
a 1% difference between two single rounds sent the default pair to the target alone for its first
16 rounds. While k = 0 wins, a round still drafts one token now and then, so a
draft that starts agreeing is noticed: after PROBE_EVERY rounds, then twice as many after each probe
whose drafts were all rejected (a probe costs a verify and the draft's catch-up), back to PROBE_EVERY
after one that agreed; but every PROBE_SOON rounds while the draft would still win at an acceptance
two standard errors above the counted one (a few unlucky first rounds must not decide for good).
While drafting wins, every PROBE_EVERY-th round runs the target alone, so the cost that drafting is
weighed against stays current.
"""

from __future__ import annotations

import numpy as np

from .speculative import RoundStats

PROBE_EVERY = 16
# ... or this often while too few tries rule the draft out: the default pair's draft, unlucky on its
# first rounds of a hard prompt (2 of 17 accepted, where 0.45 is its rate), kept auto on the target
# alone for 490 rounds, probes growing rarer
PROBE_SOON = 4
FIRST_SAMPLES = 3
_MAX_PROBE_EVERY = 64
_DECAY = 0.9  # weight of the past in the running averages of costs
# ... and in the acceptance counts: a window of about 100 drafting rounds. The default pair's acceptance
# comes in streaks (ten rejections in a row within one reply); a window of 10 took a streak for a
# useless draft, and with probes rare from then on auto ran the target alone (0.96-0.99x) where k = 1
# ran 1.01-1.05x
_ACCEPTANCE_DECAY = 0.99


class AdaptiveDraftLength:
    def __init__(self, max_k: int):
        self.max_k = max_k
        self.hits = np.zeros(max_k)  # rounds that accepted draft j+1 ...
        self.tries = np.zeros(max_k)  # ... of those offered it that accepted the first j
        self.round_cost: dict[int, float] = {}  # k offered -> seconds of a round
        self.samples: dict[int, int] = {}  # k offered -> rounds measured
        self.rounds_at_zero = 0
        self.rounds_drafting = 0
        self.probe_every = PROBE_EVERY
        self.probing = False

    def choose(self, limit: int) -> int:
        """The k for the next round, at most limit."""
        limit = min(limit, self.max_k)
        if limit == 0:
            return 0
        first = [k for k in (0, 1) if self.samples.get(k, 0) < FIRST_SAMPLES]
        if first:  # the plain step and one draft step, alternately, before modelling anything
            return min(first, key=lambda k: self.samples.get(k, 0))
        self.probing = False
        # tokens a round of k drafts yields on average: 1 + sum over j < k of P(first j+1 accepted)
        expected = np.concatenate([[1.0], 1.0 + np.cumsum(np.cumprod(self.reach()))])
        best = max((k for k in self.round_cost if k <= limit), key=lambda k: expected[k] / self.round_cost[k])
        if 0 < best < limit and best + 1 not in self.round_cost:
            return best + 1
        if best == 0:
            self.rounds_at_zero += 1
            if self.rounds_at_zero >= (PROBE_SOON if self._might_pay(expected) else self.probe_every):
                self.rounds_at_zero, self.probing = 0, True
                return 1
        else:  # the plain step's cost is what drafting must beat: keep it measured
            self.rounds_drafting += 1
            if self.rounds_drafting >= PROBE_EVERY:
                self.rounds_drafting = 0
                return 0
        return best

    def _might_pay(self, expected: np.ndarray) -> bool:
        """Whether one draft would beat the target alone at an optimistic acceptance, two standard
        errors above the counted one: too few tries to rule the draft out."""
        if 1 not in self.round_cost:
            return False
        p, n = self.reach()[0], self.tries[0] + 1
        optimistic = min(1.0, p + 2 * np.sqrt(p * (1 - p) / n))
        return (1 + optimistic) / self.round_cost[1] > expected[0] / self.round_cost[0]

    def reach(self) -> np.ndarray:
        """P(draft j+1 accepted | the first j were), for each position j."""
        rates, prior = [], 0.5
        for hits, tries in zip(self.hits, self.tries):
            prior = (hits + prior) / (tries + 1)
            rates.append(prior)
        return np.array(rates)

    def update(self, r: RoundStats) -> None:
        if self.probing and any(r.drafted):  # a probe the draft cut short found nothing either way
            self.probe_every = PROBE_EVERY if any(r.accepted) else min(2 * self.probe_every, _MAX_PROBE_EVERY)
        k = max(r.offered)
        self.samples[k] = self.samples.get(k, 0) + 1
        self.round_cost[k] = _average(self.round_cost.get(k), max(r.seconds - r.catch_up_seconds, 0.0),
                                      self.samples[k])
        if k == 0:
            return
        position = np.arange(self.max_k)
        offered, accepted = np.array(r.offered)[:, None], np.array(r.accepted)[:, None]
        self.hits = _ACCEPTANCE_DECAY * self.hits + (accepted > position).sum(axis=0)
        self.tries = _ACCEPTANCE_DECAY * self.tries + ((offered > position) & (accepted >= position)).sum(axis=0)


def _average(old: float | None, new: float, n: int) -> float:
    # the nth sample; it counts at most twice the average: one round slowed by a pause of the process
    # or the machine must not make a k look costly (and, k = 0 above all, hand the rounds to a useless draft)
    weight = 1 / n if n <= FIRST_SAMPLES else 1 - _DECAY
    return new if old is None else (1 - weight) * old + weight * min(new, 2 * old)
