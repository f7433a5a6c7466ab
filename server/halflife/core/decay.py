"""Time decay, pure NumPy: forward-decayed accumulators and Elasticsearch kernels.

Forward decay (Cormode, Shkapenyuk, Srivastava, Xu, "Forward Decay: A
Practical Time Decay Model for Streaming Systems", ICDE 2009). An event of
type k at time t_i, weight w_k and vector v_i is worth w_k·2^{-(t-t_i)/h_k}·v_i
when read at time t. With λ = ln2/h that factors as

    e^{-λ(t-L)} · [w_k·e^{λ(t_i-L)}·v_i]

for any landmark L, so each distinct rate r keeps one accumulator
S_r = Σ w·e^{λ_r(t_i-L)}·v (event types sharing a half-life share it) and a
read is Σ_r e^{-λ_r(t-L)}·S_r. Adding is a plain sum, so the result does not
depend on arrival order and late events are exact. The landmark only moves
forward ("re-basing": S_r *= e^{-λ_r(L'-L)}), before an exponent could pass
`SAFE_EXPONENT`; late events get a negative exponent, which cannot overflow
(past about -745 it underflows to 0, when the event's true worth at any
t >= L is below 1e-300 of its weight anyway).

Times are float64 seconds (e.g. Unix time); all sums are float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

LN2 = float(np.log(2.0))

# Largest exponent λ·(t_i - L) stored: e^50 ≈ 5e21 keeps sums far from
# overflow while re-basing stays rare (every ~72 h for a 1 h half-life).
SAFE_EXPONENT = 50.0


def decay_rates(half_lives_seconds) -> np.ndarray:
    """λ = ln2 / h per half-life; h = inf gives 0 (never decays).

    half_lives_seconds: array-like of positive seconds. Returns float64, same shape.
    """
    h = np.asarray(half_lives_seconds, dtype=np.float64)
    if not np.all(h > 0):  # also rejects NaN
        raise ValueError("half-lives must be positive (inf for no decay)")
    return LN2 / h


def group_rates(half_lives_seconds) -> tuple[np.ndarray, np.ndarray]:
    """Distinct decay rates and, per input half-life, the index of its rate.

    Returns (rates (R,) ascending float64, index (T,) int64) with
    rates[index] == decay_rates(half_lives_seconds).
    """
    rates = np.atleast_1d(decay_rates(half_lives_seconds))
    unique, index = np.unique(rates, return_inverse=True)
    return unique, index.reshape(rates.shape).astype(np.int64)


@dataclass(frozen=True)
class EventTypes:
    """Event types: weight w_k (negative for dislike/skip) and half-life h_k.

    weights, half_lives: (T,) (seconds; inf = no decay). `rates` (R,) are the
    distinct λ and `rate_index` (T,) maps a type to its rate's accumulator.
    """

    weights: np.ndarray
    half_lives: np.ndarray
    names: tuple[str, ...] = ()
    rates: np.ndarray = field(init=False, repr=False)
    rate_index: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        half_lives = np.asarray(self.half_lives, dtype=np.float64).reshape(-1)
        if weights.shape != half_lives.shape:
            raise ValueError("weights and half_lives must have the same length")
        if self.names and len(self.names) != weights.size:
            raise ValueError("names must match weights in length")
        rates, index = group_rates(half_lives)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "half_lives", half_lives)
        object.__setattr__(self, "rates", rates)
        object.__setattr__(self, "rate_index", index)

    @classmethod
    def from_dict(cls, spec: dict[str, tuple[float, float]]) -> "EventTypes":
        """From {name: (weight, half_life_seconds)}; type ids follow dict order."""
        names = tuple(spec)
        weights = [spec[n][0] for n in names]
        half_lives = [spec[n][1] for n in names]
        return cls(np.array(weights), np.array(half_lives), names)


def decay_factors(rates: np.ndarray, landmark: float, t: float) -> np.ndarray:
    """e^{-λ_r (t - L)} per rate: the read factor at time t, and also the
    re-basing factor for moving the landmark from L to t. Returns (R,) float64.
    For t >= L (the landmark is never after the newest event added): earlier
    reads scale up and overflow to inf ~710 / λ before L."""
    return np.exp(-np.asarray(rates, dtype=np.float64) * (t - landmark))


def read_factors(rates, landmark: float, t: float) -> np.ndarray:
    """`decay_factors` to read accumulators kept against `landmark` at time
    t: zeros while they are empty (landmark NaN). rates: (R,) or a scalar;
    returns the same shape, float64."""
    if np.isnan(landmark):
        return np.zeros(np.shape(rates))
    return decay_factors(rates, landmark, t)


def relative_read_factors(rates: np.ndarray, landmark: float, t: float, held: np.ndarray) -> np.ndarray:
    """`read_factors` of the rates that hold anything (`held`, (R,) bool),
    divided by their largest; 0 for the others. What directions and shares
    read, which a factor common to all of them does not change: the factors
    themselves underflow ~1,075 half-lives after the landmark (a 1-minute
    half-life: 18 hours). The largest is taken over the held rates only: over
    all, a slower rate no event has kept a fast one's factor underflowing.
    Returns (R,) float64."""
    out = np.zeros(np.shape(rates))
    if np.isnan(landmark) or not held.any():
        return out
    exponents = -np.asarray(rates, dtype=np.float64)[held] * (t - landmark)
    out[held] = np.exp(exponents - exponents.max())
    return out


def forward_weights(times, rates, weights, landmark: float) -> np.ndarray:
    """w·e^{λ(t_i - L)} per event: what it adds to its rate's accumulator.

    times, rates, weights: (n,) or broadcastable. Returns (n,) float64.
    """
    times = np.asarray(times, dtype=np.float64)
    return np.asarray(weights, dtype=np.float64) * np.exp(np.asarray(rates, dtype=np.float64) * (times - landmark))


def landmark_for(landmark: float, times, max_rate: float, bound: float = SAFE_EXPONENT) -> float:
    """Landmark to store a batch of events against.

    Keeps `landmark` while max_rate·(t_i - L) <= bound for every event, else
    moves it to the batch's latest time (then every exponent is <= 0). An empty
    state (landmark NaN) takes the batch's latest time. Never moves backwards,
    so late events only ever make an exponent more negative.
    """
    times = np.asarray(times, dtype=np.float64)
    if times.size == 0:
        return landmark
    latest = float(times.max())
    if np.isnan(landmark):
        return latest
    if max_rate * (latest - landmark) > bound:
        return latest
    return landmark


def rate_one_hot(rate_index: np.ndarray, coeffs: np.ndarray, n_rates: int) -> np.ndarray:
    """(R, n) matrix with coeffs[i] at (rate_index[i], i), zeros elsewhere, so
    that one GEMM with the (n, d) vectors sums each rate's events."""
    n = rate_index.shape[0]
    m = np.zeros((n_rates, n), dtype=np.float64)
    m[rate_index, np.arange(n)] = coeffs
    return m


def add_events(
    sums: np.ndarray,
    landmark: float,
    rates: np.ndarray,
    rate_index,
    weights,
    times,
    vectors,
    bound: float = SAFE_EXPONENT,
) -> tuple[np.ndarray, float]:
    """Adds a batch of events to forward-decayed accumulators.

    sums: (R, d) float64 against `landmark` (NaN when empty); rates: (R,);
    rate_index, weights, times: (n,); vectors: (n, d). Re-bases first if needed.
    Returns the new (sums (R, d), landmark); the input is not modified.
    """
    rate_index = np.asarray(rate_index, dtype=np.int64)
    times = np.asarray(times, dtype=np.float64)
    vectors = np.asarray(vectors, dtype=np.float64)
    new_landmark = landmark_for(landmark, times, float(np.max(rates, initial=0.0)), bound)
    if np.isnan(landmark):
        sums = np.zeros_like(sums, dtype=np.float64)
    elif new_landmark != landmark:
        sums = sums * decay_factors(rates, landmark, new_landmark)[:, None]
    coeffs = forward_weights(times, rates[rate_index], weights, new_landmark)
    return sums + rate_one_hot(rate_index, coeffs, rates.shape[0]) @ vectors, new_landmark


def read_decayed(sums: np.ndarray, rates: np.ndarray, landmark: float, t: float) -> np.ndarray:
    """The decayed sum at time t: Σ_r e^{-λ_r(t-L)} S_r.

    sums: (R, d) or (R,). Returns (d,) or a scalar, float64; zeros when empty.
    Exact for t >= the latest event; earlier reads scale by e^{+λ(L-t)}.
    """
    return read_factors(rates, landmark, t) @ sums


# --- Elasticsearch function_score decay kernels --------------------------------
# Computed exactly from the event log (no accumulators): the weight of an event
# at time t_i for a query `origin` (usually now). Distances are |t - origin|
# less `offset`, floored at 0; `decay` is the weight at distance `scale`.


def _distance(times, origin: float, offset: float) -> np.ndarray:
    return np.maximum(0.0, np.abs(np.asarray(times, dtype=np.float64) - origin) - offset)


def _check(scale: float, offset: float, decay: float, allow_zero_decay: bool = False) -> None:
    if not scale > 0:
        raise ValueError("scale must be positive")
    if not offset >= 0:
        raise ValueError("offset must be non-negative")
    low_ok = decay >= 0 if allow_zero_decay else decay > 0
    if not (low_ok and decay < 1):
        raise ValueError("decay must lie in (0, 1)")


def es_exp(times, origin: float, scale: float, offset: float = 0.0, decay: float = 0.5) -> np.ndarray:
    """Elasticsearch `exp`: e^{ln(decay)/scale · d}. Returns (n,) float64."""
    _check(scale, offset, decay)
    return np.exp(np.log(decay) / scale * _distance(times, origin, offset))


def es_gauss(times, origin: float, scale: float, offset: float = 0.0, decay: float = 0.5) -> np.ndarray:
    """Elasticsearch `gauss`: e^{-d²/(2σ²)}, σ² = -scale²/(2 ln decay). Returns (n,) float64."""
    _check(scale, offset, decay)
    with np.errstate(over="ignore"):  # a Python float's ** raised OverflowError past ~1e154 (a config that passed)
        sigma2 = -np.square(np.float64(scale)) / (2.0 * np.log(decay))
    d = _distance(times, origin, offset)
    return np.exp(-(d**2) / (2.0 * sigma2))


def es_linear(times, origin: float, scale: float, offset: float = 0.0, decay: float = 0.5) -> np.ndarray:
    """Elasticsearch `linear`: max(0, (s - d)/s), s = scale/(1 - decay); 0 from d = s on.
    Returns (n,) float64."""
    _check(scale, offset, decay, allow_zero_decay=True)
    s = scale / (1.0 - decay)
    return np.maximum(0.0, 1.0 - _distance(times, origin, offset) / s)  # (s - d)/s, but 1 for an infinite s


ES_KERNELS: dict[str, Callable[..., np.ndarray]] = {"exp": es_exp, "gauss": es_gauss, "linear": es_linear}


def es_kernel(
    kind: str, origin: float, scale: float, offset: float = 0.0, decay: float = 0.5
) -> Callable[[np.ndarray], np.ndarray]:
    """A times -> weights function for `kernel_sums`, parameters bound."""
    try:
        fn = ES_KERNELS[kind]
    except KeyError:
        raise ValueError(f"unknown decay kernel {kind!r}; expected one of {tuple(ES_KERNELS)}") from None
    _check(scale, offset, decay, allow_zero_decay=kind == "linear")
    return lambda times: fn(times, origin, scale, offset, decay)


def half_life_kernel(t: float, half_lives) -> Callable[[np.ndarray], np.ndarray]:
    """Per-event 2^{-(t - t_i)/h_i} read at t (half_lives (n,) per event), for
    recomputing a forward-decayed profile from the log."""
    half_lives = np.asarray(half_lives, dtype=np.float64)
    return lambda times: np.exp2(-(t - np.asarray(times, dtype=np.float64)) / half_lives)


def kernel_sums(vectors, times, weights, kernel: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Σ |w_i| · kernel(t_i) · v_i and Σ |w_i| · kernel(t_i) over the events
    of positive weight (row 0) and of negative weight (row 1) of an event
    log, or of a chunk of one (a log's sums are its chunks' sums). Summed in
    float64 by einsum, which converts float32 vectors as it goes: a float64
    copy of a 10k-event chunk's took 70-220 ms on the 2-core dev VM, the sums 8.

    vectors: (n, d); times, weights: (n,). Returns ((2, d), (2,)) float64.
    """
    weights = np.asarray(weights, dtype=np.float64)
    sides = np.stack([weights > 0, weights < 0]) * (np.abs(weights) * kernel(np.asarray(times, dtype=np.float64)))
    return np.einsum("kn,nd->kd", sides, vectors), sides.sum(axis=1)
