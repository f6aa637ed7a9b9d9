"""Which drafts are worth verifying: those expected to raise the tokens a step gives per second.

A verified draft costs a row of the step (on a CPU nearly as much as a decoding row; on a GPU at small batches
almost nothing) and gives a token only if it and every draft before it hold. So each request keeps its own estimate
of how often its drafts hold, position by position (moving averages, started from the server's), the step's cost
per row and the proposer's per guess are learned from the steps themselves, and the drafts most likely to hold are
verified first, while each one is expected to pay for what it costs. Every few steps the proposer guesses one token
past what a request is expected to verify; that guess is checked against the token the step does produce, so a
request whose drafts stopped paying finds out when they pay again.

Output is unchanged by any of this: how many drafts are verified is decided from earlier steps alone, before the
step's own draws, and verification is exact for any number of drafts.
"""
from dataclasses import dataclass, field

from loraserve.engine.sampler import Sampled
from loraserve.engine.sequence import Sequence

INITIAL_RATE = 0.5  # how often a draft is taken to hold before anything was seen
REQUEST_WEIGHT = 0.2  # weight of one observation in a request's moving average
SERVER_WEIGHT = 0.02  # ... in the server's, which new requests start from
STEP_WEIGHT = 0.1  # weight of one step's time in its row count's moving average
PROBE_INTERVAL = 4  # steps between guesses that are checked without being verified
MAX_STEP_SAMPLES = 32  # a row count's weight in the cost line, at most (moving averages, not a history)


@dataclass
class StepCosts:
    """Seconds a decoding step takes by the rows it computes: a moving average per row count seen, and a straight
    line through them (least squares, weighted by how often each was seen) for any count."""

    seconds: dict[int, float] = field(default_factory=dict)
    samples: dict[int, int] = field(default_factory=dict)
    fitted: tuple[float, float] | None = None  # the line, fitted once a step rather than at each use

    def record(self, rows: int, seconds: float) -> None:
        previous = self.seconds.get(rows)
        self.seconds[rows] = seconds if previous is None else previous + STEP_WEIGHT * (seconds - previous)
        self.samples[rows] = min(self.samples.get(rows, 0) + 1, MAX_STEP_SAMPLES)
        self.fitted = self._fit()

    def line(self) -> tuple[float, float] | None:
        """(seconds of a step's fixed part, seconds per row), both at least 0; None until two row counts were
        seen."""
        return self.fitted

    def _fit(self) -> tuple[float, float] | None:
        if len(self.seconds) < 2:
            return None
        weights = {rows: float(self.samples[rows]) for rows in self.seconds}
        total = sum(weights.values())
        mean_rows = sum(weight * rows for rows, weight in weights.items()) / total
        mean_seconds = sum(weights[rows] * seconds for rows, seconds in self.seconds.items()) / total
        spread = sum(weight * (rows - mean_rows) ** 2 for rows, weight in weights.items())
        slope = sum(weights[rows] * (rows - mean_rows) * (seconds - mean_seconds)
                    for rows, seconds in self.seconds.items()) / spread
        slope = max(slope, 0.0)
        return max(mean_seconds - slope * mean_rows, 0.0), slope


class DraftBudget:
    """What the engine knows of drafts' worth: acceptance estimates by request and position, and step costs."""

    def __init__(self, num_tokens: int) -> None:
        self.server_rates = [INITIAL_RATE] * num_tokens  # by draft position, given the ones before held
        self.rates: dict[str, list[float]] = {}  # by request
        # Each request's guesses in the step that computes its token `length` (verified or not), by request.
        self.guesses: dict[str, tuple[int, list[int]]] = {}
        self.waited: dict[str, int] = {}  # steps since a request's last guess that was only checked
        self.costs = StepCosts()
        self.guess_seconds: float | None = None  # what the proposer takes a guess, a moving average

    def limits(self, sequences: list[Sequence], limits: list[int]) -> list[int]:
        """How many tokens to ask the proposer for: each request's limit, down to the drafts it could verify if it
        were alone in paying for rows and guesses (a guess costs too: each of Medusa's heads reads the model's
        head), and one more every PROBE_INTERVAL steps, which is checked rather than verified: how an estimate
        rises while nothing is verified, or grows past the drafts verified."""
        line = self.costs.line()
        if line is None:
            return limits
        fixed, per_row = line
        with_guess = (fixed, per_row + (self.guess_seconds or 0.0))
        tokens = rows = len(sequences)
        capped = []
        for sequence, limit in zip(sequences, limits):
            likelihood, affordable = 1.0, 0
            for rate in self._rates(sequence.request_id)[:limit]:
                likelihood *= rate
                if not _pays(likelihood, tokens, rows, with_guess):
                    break
                affordable += 1
            waited = self.waited[sequence.request_id] = (self.waited.get(sequence.request_id, 0) + 1) % PROBE_INTERVAL
            capped.append(min(limit, affordable + (waited == 0)))
        return capped

    def choose(self, sequences: list[Sequence]) -> int:
        """Keep each request's guesses, then cut its drafts down to those worth verifying: drafts are taken most
        likely first, across requests, while each is expected to pay for its row. Returns how many were cut."""
        candidates = []
        for index, sequence in enumerate(sequences):
            self.guesses[sequence.request_id] = (sequence.num_tokens, list(sequence.draft_token_ids))
            likelihood = 1.0
            for position, rate in enumerate(self._rates(sequence.request_id)[:len(sequence.draft_token_ids)]):
                likelihood *= rate
                candidates.append((-likelihood, position, index))
        line = self.costs.line()
        if line is None:
            return 0  # too little seen: verify every guess, which shows what rows cost
        counts = [0] * len(sequences)
        tokens, rows = float(len(sequences)), len(sequences)
        for negative_likelihood, position, index in sorted(candidates):
            if not _pays(-negative_likelihood, tokens, rows, line):
                break
            counts[index] = position + 1
            tokens, rows = tokens - negative_likelihood, rows + 1
        for sequence, count in zip(sequences, counts):
            sequence.truncate_drafts(count)
        return len(candidates) - sum(counts)

    def observe(self, sequences: list[Sequence], results: list[Sampled]) -> None:
        """Move the estimates by what the step showed: each verified draft held or not, and the first unverified
        guess after drafts that all held is checked against the token sampled there (for a point-mass proposal,
        whether they match is a draw of exactly its acceptance; for sampled drafts it is a lower bound)."""
        for sequence, result in zip(sequences, results):
            length, guesses = self.guesses.pop(sequence.request_id, (-1, []))
            if length != sequence.num_tokens:  # no guesses made for this position
                continue
            outcomes = [True] * result.num_accepted
            if result.num_accepted < result.num_drafts:
                outcomes.append(False)
            elif len(guesses) > result.num_drafts:
                outcomes.append(guesses[result.num_drafts] == result.token_ids[-1])
            rates = self._rates(sequence.request_id)
            for position, held in enumerate(outcomes[:len(rates)]):
                rates[position] += REQUEST_WEIGHT * (held - rates[position])
                self.server_rates[position] += SERVER_WEIGHT * (held - self.server_rates[position])

    def record_proposal(self, guesses: int, seconds: float) -> None:
        """What the proposer took for a step's guesses."""
        per_guess = seconds / guesses
        previous = self.guess_seconds
        self.guess_seconds = per_guess if previous is None else previous + STEP_WEIGHT * (per_guess - previous)

    def record_step(self, rows: int, seconds: float) -> None:
        """A decoding step's time (every request computing its next token and drafts, no prompt chunks)."""
        self.costs.record(rows, seconds)

    def release(self, request_id: str) -> None:
        self.rates.pop(request_id, None)
        self.guesses.pop(request_id, None)
        self.waited.pop(request_id, None)

    def _rates(self, request_id: str) -> list[float]:
        rates = self.rates.get(request_id)
        if rates is None:
            rates = self.rates[request_id] = list(self.server_rates)
        return rates


def _pays(likelihood: float, tokens: float, rows: int, line: tuple[float, float]) -> bool:
    """Whether one more row, giving a token with this likelihood, raises the step's expected tokens per second
    (`tokens` over `rows` rows so far): (tokens + likelihood) / (time + per_row) >= tokens / time."""
    fixed, per_row = line
    return likelihood * (fixed + per_row * rows) >= tokens * per_row
