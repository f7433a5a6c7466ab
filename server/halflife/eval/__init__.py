"""Offline evaluation of Halflife on real data: `halflife eval`.

- `data`: temporal splits (global time cut, per-user leave-last-n) of an
  interaction dataset, with the relevant items of each query point.
- `embeddings`: item and tag vectors, cached on disk by model and text hash.
- `metrics`: HR@k, NDCG@k, Recall@k, MRR, coverage, bootstrap CIs over users.
- `baselines`: popularity, trending, last-item, static profile, item-kNN, SAR.
- `runner`: drives the InterestEngine (in process) or a server (gRPC), the
  baselines, the validation grid and the report.
"""
