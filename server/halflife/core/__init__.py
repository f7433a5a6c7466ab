"""Halflife's numerical core: pure, vectorized NumPy, no I/O.

- `decay`: forward-decayed accumulators (exact, order-independent time decay)
  and Elasticsearch `function_score` decay kernels.
- `profiles`: a user's decayed profile (with negative feedback) and the
  multi-interest (PinnerSage-style) profile.
- `ranking`: cosine scores, masked top-k, freshness, MMR, decayed
  popularity.
- `describe`: nearest labels and items per interest cluster.
- `cooccurrence`: the user × item incidence and the co-occurrence scores
  read from it.
- `horizon`: entries stamped after the clock, held back until a read
  reaches their time.

State objects keep only NumPy arrays and expose `to_arrays()`/`from_arrays()`
so a profile snapshot (`interest.state`) saves them with np.savez without
knowing them.
"""
