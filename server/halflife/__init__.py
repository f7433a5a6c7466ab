"""Halflife: real-time recommendations from time-decayed transformer interest profiles."""

import os

# onnxruntime's official builds record telemetry on Linux too (since 1.2x: process info with the executable's
# path, a device id, session and model-run errors) in ~/.cache/Microsoft and upload it to Microsoft where the
# network allows. Nobody running a recommendation service asked for that, so it is off unless the operator
# sets ORT_DISABLE_TELEMETRY themselves. onnxruntime reads it once, on import: hence here, before any module
# of ours can import it (docs/serving.md, "Telemetry").
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# gRPC core logs at INFO each client that leaves with a GOAWAY (the Node client's close() does) as "Got goaway
# [8] err=UNAVAILABLE": a line per client that reads as a server error (a review). Read on import too; its
# errors still show, and an operator's GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

__version__ = "0.1.0"
