"""`halflife` command line: export a model, serve it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import functools
import importlib
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

# OpenBLAS's threads spin for a core after each call: at 10k items, 8 concurrent
# Recommends ran 108 calls/s with 2 of them against ~400 with 1 (2-core machine).
# A scan that runs alone splits over cores with the engine's own threads instead
# (core.ranking.RowBlocks, docs/serving.md). OpenBLAS reads these once, as numpy
# loads, which the imports below do: set in main() alone they came too late, and
# `halflife serve` ran a BLAS thread per core (diversity's MMR took 0.2-7.9 s
# instead of 0.4; a review). main() sets them again for the workers it starts.
# An explicit environment setting wins.
SERVER_BLAS_THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _one_blas_thread_unless_set() -> None:
    for name, value in SERVER_BLAS_THREADS.items():
        os.environ.setdefault(name, value)


if sys.argv[1:2] == ["serve"]:
    _one_blas_thread_unless_set()

import grpc

from halflife.api.validation import MAX_EVENTS_PER_REQUEST, MAX_INPUTS_PER_REQUEST
from halflife.config import DEFAULT_DATA_DIR, DEFAULT_MAX_REQUESTS_MIB, DEFAULT_MODEL_DIR
from halflife.embedding.batcher import BatchingConfig
from halflife.embedding.manifest import ManifestError
from halflife.locks import missing_directories, remove_directories
from halflife.logs import StderrInBackground
from halflife.signals import sigterm_unwinds
from halflife_client.client import DEFAULT_PORT, DEFAULT_TARGET

EXIT_FAILURE = 1
EXIT_USAGE = 2  # argparse's status for a usage error


def _runtime_missing(command: str) -> bool:
    """True, said in one line, where onnxruntime cannot be imported: the
    commands that run the model need it, and only the cpu or gpu extra
    brings it (a failed `make install-gpu` leaves neither)."""
    try:
        importlib.import_module("onnxruntime")
    except ImportError:
        print(f"halflife {command}: error: onnxruntime is not installed: pip install 'halflife[cpu]' "
              "(or 'halflife[gpu]' on a CUDA machine)", file=sys.stderr)
        return True
    return False


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="convert a Hugging Face model to a validated ONNX model directory",
        description="Export a Hugging Face transformer to ONNX (fp32 O2, fp16, int8), validate "
        "every variant against PyTorch and write a self-describing model directory.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Hugging Face model directory (default: the bundled all-MiniLM-L6-v2)",
    )
    parser.add_argument("--output", required=True, type=_path, help="model directory to write")
    parser.add_argument("--model-id", default=None, help="name recorded in the manifest (default: from the model)")
    parser.add_argument(
        "--opset", type=int, default=18, help="ONNX opset, from 18 to the newest PyTorch exports (23 with torch 2.13; default 18)"
    )
    parser.add_argument(
        "--pooling",
        choices=("auto", "mean", "last_token", "cls"),
        default="auto",
        help="auto: a sentence-transformers model's own Pooling module, else mean for encoders and "
             "last_token for causal decoders",
    )
    parser.add_argument("--max-input-tokens", type=int, default=None, help="default: from the model's configs")
    parser.add_argument("--force", action="store_true", help="replace an existing model directory")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if _runtime_missing("export"):  # not the export stack's to install: it was blamed
        return EXIT_FAILURE
    try:
        from halflife_export.exporter import ExportError, ExportOptions, export_model, import_export_stack

        import_export_stack()
    except ImportError as exc:
        raise SystemExit(
            f"halflife export: error: the export stack is not installed ({exc.name}); "
            "install it with `pip install 'halflife[export]'` (or `make install`)"
        ) from None
    options = ExportOptions(
        model=args.model,
        output=args.output,
        model_id=args.model_id,
        opset=args.opset,
        pooling=args.pooling,
        max_input_tokens=args.max_input_tokens,
        force=args.force,
    )

    try:
        with sigterm_unwinds():
            export_model(options)
    except (ExportError, OSError) as exc:  # OSError: a full disk mid-export (the work directory is removed)
        print(f"halflife export: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _add_serve(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="serve the gRPC API", description="Serve Halflife's gRPC API.")
    parser.add_argument("--host", type=_host, default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; IPv6 with or without brackets: ::1, [::])")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--data-dir", type=_path, default=DEFAULT_DATA_DIR, help=f"default {DEFAULT_DATA_DIR}")
    parser.add_argument(
        "--model-dir", type=_path, default=DEFAULT_MODEL_DIR, help=f"exported model (default {DEFAULT_MODEL_DIR})"
    )
    parser.add_argument(
        "--variant",
        default=None,
        help="ONNX variant from the manifest (default: the manifest's for the provider: int8 on CPU where it "
        "validated at export, else the fp32 graph; fp16 on CUDA). With fp32-o2 a vector does not depend on its "
        "batch-mates (to ~1e-6)",
    )
    parser.add_argument(
        "--provider", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA where usable, else CPU"
    )
    parser.add_argument(
        "--workers", type=_worker_count, default=1,
        help=f"server processes sharing the port and the store (default 1, at most {MAX_WORKERS}); see docs/serving.md",
    )
    parser.add_argument(
        "--threads", type=_thread_count, default=None,
        help="threads one request computes on, per process: onnxruntime's intra-op threads and the blocks "
             "of a catalogue scan (default: physical cores / workers)",
    )
    parser.add_argument("--max-batch-tokens", type=_positive_int, default=None,
                        help="padded tokens per model batch (default: the provider's best, 2048 on CPU, 16384 on "
                             "CUDA)")
    parser.add_argument("--max-queued-inputs", type=_queue_size, default=BatchingConfig.max_queued_inputs,
                        help="queued inputs before Embed answers RESOURCE_EXHAUSTED (default %(default)s; at "
                             "least one full Embed: 256)")
    parser.add_argument("--max-requests-mib", type=_positive_int, default=DEFAULT_MAX_REQUESTS_MIB,
                        help="MiB of requests (as sent) handled at once, per process, before further calls answer "
                             "RESOURCE_EXHAUSTED (default %(default)s; one request alone is always taken)")
    parser.add_argument("--metrics-port", type=_port, default=None,
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (0 picks a free port; with "
                             "--workers N, worker i on PORT + i); default: none")
    parser.add_argument("--config", type=_path, default=None, help="TOML file of decay, weights and ranking settings")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="least severe log lines written, to stderr (default INFO)")
    # Set by `--workers N` on the processes it starts; not for direct use.
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    # The parent's pid, from the parent: os.getppid() read by the worker is 1 already when the
    # parent died while the worker started, and the worker then served on, orphaned, for good.
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    # A pipe to the parent, written once the worker serves (the parent restarts only workers that served).
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    # The model the group serves (EmbeddingEngine.identity): a worker started again later refuses another.
    parser.add_argument("--model-identity", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(run=_run_serve)


def _whole_number(value: str) -> int:
    """value as a whole number in ASCII digits (int() also takes "1_0" and
    other scripts' digits: `--workers 1_0` started 10 workers, an operations
    review), or a usage error that names no function of ours ("invalid _port value")."""
    if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}")
    return int(value)


def _int32(value: str) -> int:
    """A whole number a request's int32 field holds (the server checks the rest): protobuf raised a
    ValueError, and a traceback, for 3000000000."""
    number = _whole_number(value)
    if not -(1 << 31) <= number < 1 << 31:
        raise argparse.ArgumentTypeError(f"must be a 32-bit whole number, got {number}")
    return number


def _path(value: str) -> Path:
    """A path, not empty: Path("") is the current directory, which `serve --data-dir ""` filled."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(value)


def _positive_int(value: str) -> int:
    number = _whole_number(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _count(value: str) -> int:
    """How many of something to show: 1 up to int32's largest (past sys.maxsize, islice raised in a traceback)."""
    _int32(value)
    return _positive_int(value)


MAX_THREADS = 1024  # more than any machine's cores; 2**31 reached onnxruntime, which blamed the model
# Each worker is a whole server (model, catalogue, profiles): 10**20 started them until the machine gave out.
MAX_WORKERS = 256


def _at_most(maximum: int):
    def count(value: str) -> int:
        number = _positive_int(value)
        if number > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {number}")
        return number

    return count


_thread_count, _worker_count = _at_most(MAX_THREADS), _at_most(MAX_WORKERS)


def _queue_size(value: str) -> int:
    number = _whole_number(value)
    if number < MAX_INPUTS_PER_REQUEST:  # a full Embed would be "queue full" forever, retries and all
        raise argparse.ArgumentTypeError(f"must be at least {MAX_INPUTS_PER_REQUEST} (one full Embed), got {number}")
    return number


def _host(value: str) -> str:
    """An address to bind, IPv6 without its brackets (sockets take "::1", gRPC "[::1]:port": see
    halflife_client.client.host_port); "::1" reached gRPC bare, where --workers' parent needed it so."""
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise argparse.ArgumentTypeError("must not be empty")
    return host


def _port(value: str) -> int:
    number = _whole_number(value)
    if not 0 <= number <= 65535:  # gRPC would wrap 70000 to 4464 and -1 to 65535
        raise argparse.ArgumentTypeError(f"must be 0 to 65535, got {number}")
    return number


def _run_serve(args: argparse.Namespace) -> int:
    if _runtime_missing("serve"):
        return EXIT_FAILURE
    from halflife.api.server import ServerConfig, ServingFailedError, serve
    from halflife.config import ConfigError, changed_settings, load_config
    from halflife.locks import claim_data_dir
    from halflife.storage.base import StoreError, StoreUnavailableError
    from halflife.workers import EXIT_TEMPORARY

    # A group's worker says which it is on its error lines too, as on its log lines.
    worker = "" if args.worker_index is None else f"[worker {args.worker_index}] "
    try:
        halflife_config = load_config(args.config)
    except ConfigError as exc:
        print(f"{worker}halflife serve: error: config: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s %(levelname)s {worker}%(name)s: %(message)s",
                        handlers=[StderrInBackground()])
    # grpc's Cython layer logs a DEBUG line per call ("Loaded running loop"): most of a DEBUG log (a review).
    logging.getLogger("grpc._cython.cygrpc").setLevel(max(logging.INFO, logging.getLogger().level))
    if args.metrics_port and args.port and args.metrics_port <= args.port < args.metrics_port + args.workers:
        # It failed as "cannot bind ... (in use by another process ...)", the other being itself (a review).
        print(f"halflife serve: error: argument --metrics-port: {args.port} is --port; metrics need a port of "
              f"their own{' for each worker' if args.workers > 1 else ''}", file=sys.stderr)
        return EXIT_USAGE
    if args.workers > 1 and args.metrics_port and args.metrics_port + args.workers - 1 > 65535:
        print(f"halflife serve: error: argument --metrics-port: {args.workers} workers serve on "
              f"{args.metrics_port} to {args.metrics_port + args.workers - 1}, past 65535", file=sys.stderr)
        return EXIT_USAGE
    if args.config is not None and args.worker_index is None:  # a group's parent says it for its workers
        # Nothing said whether, or which, settings were in effect.
        changed = changed_settings(halflife_config)
        logging.getLogger("halflife.config").info(
            "settings from %s: %s", args.config, "; ".join(changed) + " (the rest default)" if changed else "the defaults")
    if args.workers > 1:
        code = _run_workers(args)
        _ignore_stop_signals()  # as a single server's below: the parent's exit, its workers ended
        return code
    batching = BatchingConfig(max_batch_tokens=args.max_batch_tokens, max_queued_inputs=args.max_queued_inputs)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        model_dir=args.model_dir,
        data_dir=args.data_dir,
        variant=args.variant,
        provider=args.provider,
        intra_op_threads=args.threads,
        scan_threads=args.threads,
        batching=batching,
        halflife=halflife_config,
        reuse_port=args.worker_index is not None,
        follow_store=args.worker_index is not None,
        model_identity=args.model_identity,
        metrics_port=_metrics_port(args),
        max_requests_bytes=args.max_requests_mib << 20,
    )
    made = missing_directories(args.data_dir)
    lock = None
    try:
        try:
            if args.worker_index is None:  # a group's parent holds the data directory for its workers
                _check_model(args)  # a missing model (or variant) is refused before the data directory is made
                lock = claim_data_dir(args.data_dir)
            run_event_loop(serve(config, parent_pid=args.parent_pid, ready_fd=args.ready_fd))
        finally:
            _flush_logs()  # the lines logged before ("settings from", "stopped"), then the error line printed below
        _ignore_stop_signals()
    except ServingFailedError as exc:
        print(f"{worker}halflife serve: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (ManifestError, StoreError, OSError) as exc:
        print(worker + _start_refused(exc, args.data_dir), file=sys.stderr)
        if lock is not None and made:
            _remove_unused_data_dir(lock, made)
        # A group's worker that may start later says so: its parent starts a replacement again (workers.py).
        return EXIT_TEMPORARY if worker and isinstance(exc, StoreUnavailableError) else EXIT_FAILURE
    finally:
        if lock is not None:
            lock.close()
    return 0


def _flush_logs() -> None:
    """Waits (briefly) for the log lines written in the background (StderrInBackground)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def _ignore_stop_signals() -> None:
    """After a completed stop the process takes ~0.1 s more to exit (the
    interpreter's teardown, onnxruntime's) without the event loop's
    handlers: a repeat within the window (`halflife.signals`), a wrapper's
    second SIGTERM or a double Ctrl-C 20-150 ms apart, ended it by the
    signal (status 143 or 130) instead of 0. Nothing is left for one to cut short."""
    from halflife.signals import STOP_SIGNALS

    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _remove_unused_data_dir(lock, made: list[Path]) -> None:
    """Removes the data directory a failed start made (`made`, with its
    parents: `missing_directories`), if nothing but its lock (held: no other
    server uses it) went in: a bad flag (variant, provider, port) left an
    empty directory behind."""
    from halflife.locks import DATA_DIR_LOCK, remove_lock

    data_dir = made[0]
    try:
        if [p.name for p in data_dir.iterdir()] == [DATA_DIR_LOCK]:
            remove_lock(lock, data_dir / DATA_DIR_LOCK)
            remove_directories(made)
    except OSError:
        pass  # left as it is: nothing of the user's is in it


def _check_model(args: argparse.Namespace) -> str:
    """The identity of the model `serve` would load (`served_identity`);
    ManifestError for a model directory, a --variant or a --provider that
    cannot serve: before the port is bound or a worker started."""
    from halflife.embedding.engine import served_identity

    return served_identity(args.model_dir, variant=args.variant, provider=args.provider)


def _metrics_port(args: argparse.Namespace) -> int | None:
    """This process's --metrics-port: worker i of a group serves its own on PORT + i (0: each a free one)."""
    if not args.metrics_port or args.worker_index is None:
        return args.metrics_port
    return args.metrics_port + args.worker_index


def _run_workers(args: argparse.Namespace) -> int:
    from halflife.config import ConfigError
    from halflife.cpu import physical_cores
    from halflife.locks import claim_data_dir
    from halflife.storage.base import StoreError
    from halflife.workers import run_workers, worker_threads

    made = missing_directories(args.data_dir)
    try:
        # A worker that dies is started again with these flags, maybe long after the others: it must
        # serve what they serve, not the files as they are by then (an audit edited the config, and a
        # restarted worker refused limits its sibling took and ranked otherwise). So every worker reads
        # a copy of the config taken now, and refuses a model other than the one found now (one clear
        # error here, rather than one per worker, where there is none).
        serve_argv = [*args.argv[1:], "--model-identity", _check_model(args)]
        # Each worker inherits the lock's open file: the directory stays taken until
        # the last of them has exited, even after a SIGKILL of this parent (an audit
        # started a new server there while orphaned workers still committed writes).
        with claim_data_dir(args.data_dir, f"pid {os.getpid()} and the workers it started") as lock:
            try:
                with _config_for_workers(args.config, args.data_dir) as config_argv:
                    threads = worker_threads(args.threads, args.workers, physical_cores())
                    return run_workers([*serve_argv, *config_argv], args.host, args.port, args.workers, threads,
                                       keep_fds=(lock.fileno(),), prepare=lambda: _prepare_store(args.data_dir, args.model_dir))
            except (OSError, ConfigError):
                if made:
                    _remove_unused_data_dir(lock, made)
                raise
    except ConfigError as exc:
        _flush_logs()  # the lines logged before ("settings from"), then the error line
        print(f"halflife serve: error: config: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (ManifestError, StoreError, OSError) as exc:
        _flush_logs()
        print(_start_refused(exc, args.data_dir), file=sys.stderr)
        return EXIT_FAILURE


def _start_refused(exc: BaseException, data_dir: Path) -> str:
    """serve's one line for a start it gave up: a damaged store's names the
    file and the way back (SQLite's "database disk image is malformed" said
    neither: an operations review)."""
    from halflife.storage.base import StoreDamagedError
    from halflife.storage.sqlite import DB_NAME

    if isinstance(exc, StoreDamagedError):
        return (f"halflife serve: error: {exc} ({data_dir / DB_NAME}: restore it from a backup, "
                'docs/interest.md "Storage")')
    return f"halflife serve: error: {exc}"


WORKERS_CONFIG = "workers-config.toml"  # in the data directory, for a --workers group's life


def _prepare_store(data_dir: Path, model_dir: Path) -> None:
    """Once, before any worker opens the store: its migrations, and the
    change feed pruned while no worker follows it (a restarted worker must
    not: its siblings do). Neither for a store the workers would refuse for
    another model's vectors: a refused start changes nothing."""
    from halflife.embedding.engine import former_vector_spaces, named_vector_space
    from halflife.embedding.manifest import load_manifest
    from halflife.interest.engine import refuse_other_models_store
    from halflife.storage.sqlite import SqliteStore, stored_vectors

    manifest = load_manifest(model_dir)
    refuse_other_models_store(*stored_vectors(data_dir), manifest.dimension, named_vector_space(manifest),
                              former_vector_spaces(manifest))
    with SqliteStore(data_dir) as store:
        store.prune_change_feed()


@contextlib.contextmanager
def _config_for_workers(path: Path | None, data_dir: Path) -> Iterator[list[str]]:
    """The workers' --config flags: a copy of the file at `path`, checked as
    they will read it (the file may have changed since serve read it; errors
    name it), kept in the data directory while the group runs, where no
    temporary-file cleaner deletes it under a long-running group. Raises
    ConfigError."""
    from halflife.config import config_from_text, read_config_text

    if path is None:
        yield []
        return
    text = read_config_text(path)
    config_from_text(text, path)
    copy = (data_dir / WORKERS_CONFIG).absolute()
    copy.write_text(text, encoding="utf-8")
    try:
        yield ["--config", str(copy)]
    finally:
        copy.unlink(missing_ok=True)


AS_OF_HELP = "ISO time (UTC unless it gives an offset) or unix seconds; default now"
TARGET_HELP = f"server host[:port] (default {DEFAULT_TARGET}; port {DEFAULT_PORT} where none is given)"


def _address(value: str) -> str:
    """A --target, as the clients take it (`server_target`): one without a
    port gets serve's, where gRPC would have gone to 443. gRPC logs a
    multi-line trace of its own for an empty target, and wraps a port out of range."""
    from halflife_client.client import server_target

    try:
        return server_target(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _utf8(value: str) -> str:
    """An argument the API takes as a string: bytes the shell passed that are
    no UTF-8 (Python holds them as surrogates) were a UnicodeEncodeError traceback."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"must be valid UTF-8, got {value.encode(errors='surrogateescape')!r}") from None
    return value


def _batch_size(value: str) -> int:
    number = _positive_int(value)
    if number > MAX_EVENTS_PER_REQUEST:  # the server refuses a bigger RecordEvents, after every item was sent
        raise argparse.ArgumentTypeError(f"must be at most {MAX_EVENTS_PER_REQUEST} (the server's limit), got {number}")
    return number


def _duration(value: str) -> float:
    from halflife.loadtest import parse_duration

    try:
        return parse_duration(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a duration such as 10s, 1m30s or 500ms, got {value!r}") from None


def _timestamp(value: str) -> dt.datetime:
    """ISO 8601 (naive = UTC) or unix seconds."""
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if value.strip().isdigit() and len(value.strip()) <= 4:  # `--since 2026` listed from 1970-01-01T00:33:46Z
            raise argparse.ArgumentTypeError(f"{value!r} reads as unix seconds, within three hours of 1970: for a year "
                                             f"give a date ({value.strip()}-01-01); for unix seconds, 5 digits or more")
        try:
            return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise argparse.ArgumentTypeError(f"unix seconds out of range (years 1 to 9999): {value!r}") from None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time or unix seconds: {value!r}") from None
    try:  # in UTC, where an offset may carry it past year 9999 or before year 1
        return parsed.astimezone(dt.timezone.utc) if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"out of range in UTC (years 1 to 9999): {value!r}") from None


def _add_client_commands(commands: argparse._SubParsersAction) -> None:
    load = commands.add_parser("load-movielens", help="load a MovieLens directory into a running server")
    load.add_argument("directory", type=_path, help="e.g. ../shared/data/ml-latest-small")
    load.add_argument("--target", type=_address, default=DEFAULT_TARGET, help=TARGET_HELP)
    load.add_argument("--batch-size", type=_batch_size, default=500, help="events per RecordEvents call (default 500, at most 1000)")
    load.set_defaults(run=_run_load)

    recommend = commands.add_parser("recommend", help="show a user's recommendations, explained")
    recommend.add_argument("user_id", type=_utf8)
    recommend.add_argument("--limit", type=_int32, default=10, help="how many items (default 10)")
    recommend.add_argument("--as-of", type=_timestamp, default=None, help=AS_OF_HELP)
    recommend.add_argument("--query", type=_utf8, default="", help="text whose cosine with each item is blended into the score (ranking.query_weight)")
    recommend.add_argument("--target", type=_address, default=DEFAULT_TARGET, help=TARGET_HELP)
    recommend.set_defaults(run=_run_recommend)

    profile = commands.add_parser("profile", help="show a user's interests in words")
    profile.add_argument("user_id", type=_utf8)
    profile.add_argument("--as-of", type=_timestamp, default=None, help=AS_OF_HELP)
    profile.add_argument("--target", type=_address, default=DEFAULT_TARGET, help=TARGET_HELP)
    profile.set_defaults(run=_run_profile)

    events = commands.add_parser("events", help="show the events recorded last for a user, the last first")
    events.add_argument("user_id", type=_utf8)
    events.add_argument("--limit", type=_count, default=20, help="how many events (default 20)")
    events.add_argument("--since", type=_timestamp, default=None,
                        help="only events of this time (ISO, UTC unless it gives an offset, or unix seconds) or later")
    events.add_argument("--until", type=_timestamp, default=None, help="only events before this time (as --since)")
    events.add_argument("--target", type=_address, default=DEFAULT_TARGET, help=TARGET_HELP)
    events.set_defaults(run=_run_events)


def _add_loadtest(commands: argparse._SubParsersAction) -> None:
    from halflife.loadtest import DURATION_STOPS

    parser = commands.add_parser(
        "loadtest",
        help="drive an RPC with concurrent load and print a ghz-style JSON report",
        description="An asyncio gRPC load generator with ghz's flags and JSON report (durations in ns). "
        "Ctrl-C stops the load and prints the report of what ran, then exits 130.",
    )
    parser.add_argument("--config", type=_path, default=None, help="a ghz JSON config (e.g. clients/ghz/*.json)")
    parser.add_argument("--call", default=None, help="e.g. halflife.v1.EmbeddingService.Embed")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("-d", "--data", default=None,
                      help="request as proto3 JSON, or a JSON array of requests sent in turn; @: read it from stdin "
                           "(default {})")
    data.add_argument("-D", "--data-file", type=_path, default=None, help="file holding the --data JSON")
    parser.add_argument("-c", "--concurrency", type=int, default=None, help="concurrent calls (default 8)")
    parser.add_argument("-n", "--total", type=int, default=None, help="requests to send (default 200; ignored with -z)")
    parser.add_argument("-z", "--duration", type=_duration, default=None,
                        help="send for this long, whatever -n says, e.g. 10s or 1m30s (at most 600s)")
    parser.add_argument("-x", "--max-duration", type=_duration, default=None,
                        help="stop after this long or at -n requests, whichever comes first")
    parser.add_argument("--duration-stop", choices=DURATION_STOPS, default=None,
                        help="calls in flight when -z/-x ends the run: close (default) cancels them and reports them as "
                             "Canceled, wait lets them finish within -t, ignore cancels them and leaves them out")
    parser.add_argument("--connections", type=int, default=None, help="TCP connections (default 1; raised to one per 256 workers, the most the server carries on one)")
    parser.add_argument("-r", "--rps", type=float, default=None, help="request rate limit (default 0: none)")
    parser.add_argument("-t", "--timeout", type=_duration, default=None,
                        help="per-call deadline (default 20s; 0: none, within the 600 s cap on a run)")
    parser.add_argument("--target", type=_address, default=None, help=TARGET_HELP)
    parser.add_argument("host", nargs="?", type=_address, default=None,
                        help="the target as ghz's last argument (instead of --target)")
    parser.add_argument("--allow-remote", action="store_true", help="permit a non-loopback target")
    parser.add_argument("-O", "--format", choices=("json", "summary"), default="json")
    # ghz's flags with nothing to do here, as its config keys (loadtest.GHZ_NEEDLESS_KEYS): a ghz command
    # line runs as it is (an audit's `--insecure HOST` was refused under the top-level usage).
    needless = "accepted for ghz command lines: the API's descriptors are built in"
    parser.add_argument("--insecure", action="store_true", help="accepted for ghz command lines: connections are plaintext")
    parser.add_argument("--proto", default=None, help=needless)
    parser.add_argument("--protoset", default=None, help=needless)
    parser.add_argument("-i", "--import-paths", default=None, help=needless)
    for flags in GHZ_UNSUPPORTED_FLAGS:
        parser.add_argument(*flags, nargs="?", action=_GhzFlagUnsupported, help=argparse.SUPPRESS)
    parser.set_defaults(run=_run_loadtest)


# ghz's flags that halflife loadtest lacks (its config keys are refused alike, in loadtest._ghz_options).
# Undeclared, a flag's value was read as the target: `-m '{"k": "v"}' HOST` failed as "argument host: port
# must be 1 to 65535", and `--name test HOST` as "unrecognized arguments: --name HOST".
GHZ_UNSUPPORTED_FLAGS = (
    ("-m", "--metadata"), ("-M", "--metadata-file"), ("--reflect-metadata",), ("-b", "--binary"),
    ("-B", "--binary-file"), ("--cacert",), ("--cert",), ("--key",), ("--cname",), ("--skipTLS",),
    ("--authority",), ("--async",), ("--load-schedule",), ("--load-start",), ("--load-step",), ("--load-end",),
    ("--load-step-duration",), ("--load-max-duration",), ("--concurrency-schedule",), ("--concurrency-start",),
    ("--concurrency-step",), ("--concurrency-end",), ("--concurrency-step-duration",),
    ("--concurrency-max-duration",), ("--stream-interval",), ("--stream-call-duration",), ("--stream-call-count",),
    ("--stream-dynamic-messages",), ("-o", "--output"), ("--skipFirst",), ("--count-errors",),
    ("--connect-timeout",), ("--keepalive",), ("--name",), ("--tags",), ("--cpus",), ("--debug",),
    ("-e", "--enable-compression"), ("--lb-strategy",), ("--disable-template-functions",),
    ("--disable-template-data",), ("--max-recv-message-size",), ("--max-send-message-size",),
)


class _GhzFlagUnsupported(argparse.Action):
    """Refuses one of GHZ_UNSUPPORTED_FLAGS by name (its value, if any, taken with it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, "is ghz's, which halflife loadtest does not support "
                                           "(clients/ghz/README.md lists what it shares with ghz)")


async def _until_interrupted(run, stopping: str | None = None):
    """Awaits run(stop), setting `stop` on the first Ctrl-C so that the load stops
    and the report of what ran comes back; a second Ctrl-C interrupts outright.
    stopping: said on stderr at the first Ctrl-C, where the stop may take a while."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def interrupted() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)
        if stopping:
            print(f"halflife loadtest: {stopping}", file=sys.stderr)

    try:
        loop.add_signal_handler(signal.SIGINT, interrupted)
    except NotImplementedError:  # Windows' event loops: Ctrl-C interrupts outright
        return await run(stop), False
    try:
        return await run(stop), stop.is_set()
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _run_loadtest(args: argparse.Namespace) -> int:
    from halflife.loadtest import (
        LoadTestError, bounds_applied, options_from_flags, options_from_ghz_config, read_data_file, run_load_test,
        summary,
    )

    if args.target is not None and args.host is not None:
        print("halflife loadtest: error: give the target once: --target or a last argument", file=sys.stderr)
        return EXIT_USAGE
    try:
        data = sys.stdin.read() if args.data == "@" else args.data
        if args.data_file is not None:
            data = read_data_file(args.data_file)
        flags = {
            "call": args.call, "data": data, "target": args.target or args.host, "concurrency": args.concurrency,
            "total": args.total, "duration": args.duration, "max_duration": args.max_duration,
            "duration_stop": args.duration_stop, "connections": args.connections, "rps": args.rps,
            "timeout": args.timeout, "allow_remote": args.allow_remote,
        }
        if args.config is not None:
            options = options_from_ghz_config(args.config, **flags)
        else:
            options = options_from_flags(**flags)
    except LoadTestError as exc:  # a bad option, data or config: a usage error, as argparse's own
        print(f"halflife loadtest: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for note in bounds_applied(options):
        print(f"halflife loadtest: note: {note}", file=sys.stderr)
    try:
        # --duration-stop wait lets the calls in flight finish (within -t): the wait said, not silent (an audit).
        stopping = ("stopping: the calls in flight may finish (--duration-stop wait, within -t); Ctrl-C again "
                    "to quit without a report") if options.duration_stop == "wait" else None
        report, interrupted = run_event_loop(_until_interrupted(lambda stop: run_load_test(options, stop), stopping))
    except LoadTestError as exc:
        print(f"halflife loadtest: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    # The verdict first: a report whose reader left (| head) must not hide it.
    code = 0
    if interrupted:  # ghz exits 0 here; a script should not take a cut-short run for a finished one
        print(f"halflife loadtest: interrupted; the report covers the {report['count']} calls made", file=sys.stderr)
        code = 130
    elif not report["statusCodeDistribution"].get("OK"):
        # ghz exits 0 here; a script or CI step that load-tests a dead or refusing server should fail.
        print(f"halflife loadtest: error: none of the {report['count']} calls succeeded", file=sys.stderr)
        code = EXIT_FAILURE
    try:
        print(json.dumps(report, indent=2) if args.format == "json" else summary(report), flush=True)
    except BrokenPipeError:
        if not code:
            raise
        _stdout_to_devnull()
    return code


# The flags of the client commands that set a request's fields: a violation of one names it too (a server whose
# ranking.max_limit is 5 refused `recommend`'s default limit of 10, and the message named no flag to change).
_FLAG_OF_FIELD = {"limit": "--limit", "as_of_time": "--as-of", "query": "--query"}


def _rpc_failure(name: str, error: grpc.RpcError, target: str, context: str = "", then: str = "") -> int:
    """Prints a failed call as one line (its status and details, or its field violations), `then` after it."""
    from halflife_client import field_violations

    flags = _FLAG_OF_FIELD if name in ("recommend", "profile", "events") else {}  # eval has no --limit
    details = "; ".join(f"{field}{f' ({flags[field]})' if field in flags else ''}: {text}"
                        for field, text in field_violations(error)) or error.details()
    # gRPC's words when nothing answered at `target` (connection refused, no such socket), not a server's UNAVAILABLE.
    if error.code() == grpc.StatusCode.UNAVAILABLE and details.startswith("failed to connect to all addresses"):
        details += f"; is `halflife serve` running on {target}?"
    print(f"halflife {name}: error: {context}{error.code().name}: {details}{then}", file=sys.stderr)
    return EXIT_FAILURE


def _client_command(name: str, target: str, fn, *args, then: str = "") -> int:
    """Runs a client command of the server at `target`; gRPC, file, dataset and version errors become one line on
    stderr (a failed call's followed by `then`)."""
    from halflife.datasets.interactions import DatasetError
    from halflife_client import ServerTooOldError

    try:
        fn(*args)
    except grpc.RpcError as error:
        return _rpc_failure(name, error, target, then=then)
    except BrokenPipeError:  # stdout's reader left: not an error of the command (see main)
        raise
    except (OSError, KeyError, DatasetError, ServerTooOldError) as exc:
        print(f"halflife {name}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _run_load(args: argparse.Namespace) -> int:
    from halflife.commands import load_movielens

    def run():
        totals = load_movielens(args.directory, args.target, args.batch_size)
        print(", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in totals.items()))

    # A load a server's restart stopped did not say that running it again is safe (a clients review).
    return _client_command("load-movielens", args.target, run,
                           then=" (run it again when the server answers: what is stored is not stored twice)")


def _run_recommend(args: argparse.Namespace) -> int:
    from halflife.commands import show_recommendations

    return _client_command("recommend", args.target, show_recommendations, args.user_id, args.target, args.limit,
                           args.as_of, args.query)


def _run_profile(args: argparse.Namespace) -> int:
    from halflife.commands import show_profile

    return _client_command("profile", args.target, show_profile, args.user_id, args.target, args.as_of)


def _run_events(args: argparse.Namespace) -> int:
    from halflife.commands import show_events

    if args.since is not None and args.until is not None and not args.until > args.since:
        print("halflife events: error: argument --until: must be after --since (the events from --since up to, "
              "not including, --until)", file=sys.stderr)
        return EXIT_USAGE

    return _client_command("events", args.target, show_events, args.user_id, args.target, args.limit, args.since,
                           args.until)


def _add_reembed(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "reembed",
        help="copy a data directory into a new one, embedded by another model",
        description="Copy a data directory's catalogue and event log into a new data directory, every item and "
        "event text embedded again by the model in --model-dir: a store keeps the vectors of the model it was "
        "built with, and a server refuses it with another one (docs/interest.md, Storage). The old "
        "store is only read, but opened as `serve` opens it: writable, and migrated from an older schema; "
        "events recorded in it after the copy starts are not copied, and an item or user change meanwhile fails "
        "the copy: stop what writes to it first.",
    )
    parser.add_argument("--data-dir", type=_path, default=DEFAULT_DATA_DIR,
                        help=f"the data directory to copy (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--out", type=_path, required=True, help="the new data directory (absent or empty)")
    parser.add_argument("--model-dir", type=_path, default=DEFAULT_MODEL_DIR,
                        help=f"the new model, exported (default {DEFAULT_MODEL_DIR})")
    parser.add_argument("--variant", default=None,
                        help="ONNX variant from the manifest (default: the one `serve` would load on this machine)")
    parser.add_argument("--item-vectors", type=_path, default=None, metavar="FILE",
                        help='the new model\'s vectors of items, JSON lines {"id": "...", "vector": [...]}, taken '
                        "instead of embedding their text: every item whose vector was given with it (UpsertItems) "
                        "needs one; without them the copy is refused, their ids written to stdout as such lines, "
                        "without the vectors")
    parser.set_defaults(run=_run_reembed)


@contextlib.contextmanager
def _removed_unless_done(directory: Path, made: list[Path]) -> Iterator[None]:
    """What was written into `directory` (empty or absent before) goes again,
    with the directories `made` for it (`missing_directories`), if the block
    fails or is interrupted: a half copy would otherwise pass for a store, and
    block the next try."""
    try:
        yield
    except BaseException:
        if directory.is_dir():
            for path in directory.iterdir():
                path.unlink()
            remove_directories(made)
        raise


def _run_reembed(args: argparse.Namespace) -> int:
    if _runtime_missing("reembed"):
        return EXIT_FAILURE
    from halflife.config import Config
    from halflife.embedding.engine import EmbeddingEngine
    from halflife.embedding.offline import embed_sorted
    from halflife.interest.engine import InterestEngine
    from halflife.interest.reembed import (GivenVectorsError, ItemVectorsFileError, SourceChangedError,
                                           read_item_vectors, reembed)
    from halflife.locks import UNFINISHED_COPY_MARK, claim_data_dir
    from halflife.progress import progress
    from halflife.storage.base import StoreError, StoreUnavailableError
    from halflife.storage.sqlite import DB_NAME, SqliteStore, sync_directory

    def fail(message: str) -> int:
        print(f"halflife reembed: error: {message}", file=sys.stderr)
        return EXIT_FAILURE

    if not (args.data_dir / DB_NAME).is_file():
        return fail(f"{args.data_dir} holds no store ({DB_NAME})")
    # Any readable path but a directory: read once, front to back, so a pipe (`<(...)`, /dev/stdin) serves too.
    if args.item_vectors is not None and (args.item_vectors.is_dir() or not args.item_vectors.exists()):
        return fail(f"argument --item-vectors: {args.item_vectors} is "
                    f"{'a directory' if args.item_vectors.is_dir() else 'missing'}")
    # A half copy as the source was copied as if whole, and the result, unmarked, served (a review).
    if (args.data_dir / UNFINISHED_COPY_MARK).exists():
        return fail(f"{args.data_dir} holds a `halflife reembed` copy that has not finished (it is still running, or "
                    "was killed): copy the store it came from instead")
    if (args.out / UNFINISHED_COPY_MARK).exists():
        try:  # refused either way: held by the copy still running, or the mark of one killed (as `serve` says)
            claim_data_dir(args.out).close()
        except OSError as exc:
            return fail(str(exc))
    # As named once made: "new/.." is the directory `new` goes in, whose files a failed copy removed (a review).
    named = args.out.resolve()
    if named.exists() and (not named.is_dir() or any(named.iterdir())):
        return fail(f"{args.out} is not an empty directory: the copy goes into a data directory of its own")
    made = missing_directories(args.out)
    try:
        with sigterm_unwinds():
            # Held as `serve` holds it: a server started on the copy meanwhile answered from half of it. Taken
            # before anything is removed on failure: refused, what is there is another process's.
            try:
                lock = claim_data_dir(args.out, f"pid {os.getpid()}, halflife reembed copying into it")
            except OSError:
                remove_directories(made)  # those left empty: another process's claim keeps its own
                raise
            with lock, _removed_unless_done(args.out, made):
                unfinished = args.out / UNFINISHED_COPY_MARK
                unfinished.touch()
                try:  # before any of the copy: lost in a power cut, a half copy would serve
                    sync_directory(args.out)
                except OSError as exc:  # a file system that syncs no directory: the copy goes on, said
                    print(f"halflife reembed: warning: cannot sync {args.out} ({exc.strerror or exc}): a power cut "
                          "during the copy could leave it unmarked", file=sys.stderr)
                model = EmbeddingEngine.load(args.model_dir, variant=args.variant)
                model.warm_up()  # a manifest that does not fit its model: one line, as `serve` says it
                vectors = {} if args.item_vectors is None else read_item_vectors(args.item_vectors, model.dimension)
                source, target = SqliteStore(args.data_dir), SqliteStore(args.out)
                try:
                    source.check_intact()  # damage can end a read early, unsaid: the copy would miss what it hides
                    engine = InterestEngine(Config(), target, model.dimension,
                                            lambda texts, deadline=None: embed_sorted(model, texts),
                                            embedder_id=model.identity, vector_space=model.named_vector_space)
                    done = reembed(source, engine, lambda starts, what: progress(
                        starts, desc=f"re-embedding {what}", unit="batch"), vectors=vectors)
                finally:
                    source.close()
                    target.close()
                unfinished.unlink()
    except StoreUnavailableError as exc:  # "database or disk is full" named neither store (a review)
        return fail(f"{exc} (copying {args.data_dir} into {args.out}: what it wrote there is removed)")
    except GivenVectorsError as exc:
        try:  # the file to fill in for --item-vectors
            sys.stdout.writelines(json.dumps({"id": item_id}) + "\n" for item_id in exc.item_ids)
            sys.stdout.flush()
        except OSError as error:
            if isinstance(error, BrokenPipeError):
                raise
            return fail(f"{exc}; their ids could not be written: {error}")
        return fail(f"{exc}; their ids are on stdout, one {{\"id\": ...}} a line: add each one's \"vector\" and give "
                    "the file with --item-vectors")
    except (ManifestError, StoreError, SourceChangedError, ItemVectorsFileError, OSError) as exc:
        return fail(str(exc))
    try:
        print(f"copied {done.items} items and {done.events} events (the log through seq {done.through_seq}) into "
              f"{args.out}, embedded by {model.named_vector_space[1]}")
        if done.without_item or done.left_out:
            print(f"{done.without_item} events on items deleted since were copied with their text alone, and "
                  f"{done.left_out} without text were left out: the new model has no vector for their items")
        if done.recorded_since:
            print(f"{done.recorded_since} events recorded in {args.data_dir} since the copy began are not in it")
        if done.vectors_unused:
            print(f"{done.vectors_unused} vectors of {args.item_vectors} are of items not in {args.data_dir}: "
                  "not used")
    except OSError as exc:  # stdout full or gone: the copy is complete all the same (BrokenPipeError: see main)
        if isinstance(exc, BrokenPipeError):
            raise
        return fail(f"the copy into {args.out} is complete, but its report could not be written: {exc}")
    return 0


def _add_vacuum(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "vacuum",
        help="rewrite a stopped server's store with only its live rows (after erasures)",
        description="Rewrite the store in --data-dir whole, with only its live rows. DeleteUser zeroes the rows it "
        "deletes, but SQLite can keep old copies of moved entries in a page's unused space, where an erased user's "
        "id can outlive the erasure in the file's bytes; this takes them, and the free pages, out "
        "(docs/interest.md, Storage). The server must be stopped: the data directory is taken as `serve` takes it. "
        "Needs the store's size free on its disk; an interruption leaves the store as it was.",
    )
    parser.add_argument("--data-dir", type=_path, default=DEFAULT_DATA_DIR,
                        help=f"the data directory (default {DEFAULT_DATA_DIR})")
    parser.set_defaults(run=_run_vacuum)


def _run_vacuum(args: argparse.Namespace) -> int:
    from halflife.locks import claim_data_dir
    from halflife.storage.base import StoreError
    from halflife.storage.sqlite import DB_NAME, vacuum

    if not (args.data_dir / DB_NAME).is_file():
        print(f"halflife vacuum: error: {args.data_dir} holds no store ({DB_NAME})", file=sys.stderr)
        return EXIT_FAILURE
    started = time.monotonic()
    try:
        with sigterm_unwinds(), claim_data_dir(args.data_dir, f"pid {os.getpid()}, halflife vacuum"):
            before, after = vacuum(args.data_dir)
    except (StoreError, OSError) as exc:
        print(f"halflife vacuum: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"vacuumed {args.data_dir / DB_NAME} in {time.monotonic() - started:.1f} s: {before / 2**20:.1f} MiB -> "
          f"{after / 2**20:.1f} MiB, only its live rows")
    return 0


def _add_eval(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="offline evaluation on a dataset: baselines, Halflife, tuned defaults, report",
        description="Temporal offline evaluation (docs/evaluation.md): full-catalogue ranking, "
        "baselines, a validation grid for the blend, test-period numbers with bootstrap CIs, plots.",
    )
    parser.add_argument("--data", type=_path, default=Path("../shared/data/ml-latest-small"),
                        help="MovieLens-shaped directory (ratings.csv, movies.csv, tags.csv; default "
                             "../shared/data/ml-latest-small, from the working directory)")
    parser.add_argument("--model-dir", type=_path, default=DEFAULT_MODEL_DIR,
                        help=f"exported model (default {DEFAULT_MODEL_DIR})")
    parser.add_argument("--out", type=_path, default=Path("bench/results/eval"),
                        help="results.json, tables.md and the PNGs (default bench/results/eval: replaces the committed "
                             "results)")
    parser.add_argument("--cache-dir", type=_path, default=Path("var/eval-cache"),
                        help="cached item/tag vectors (default var/eval-cache)")
    parser.add_argument("--target", type=_address, default=None,
                        help="also measure a running, empty server over gRPC (host:port) with its own config")
    parser.add_argument("--write-config", type=_path, default=None, help="write the chosen settings as TOML")
    parser.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    if _runtime_missing("eval"):  # it embeds the dataset in process, --target or not
        return EXIT_FAILURE
    try:
        from halflife.eval.runner import TargetError, run
    except ImportError as exc:
        raise SystemExit(f"halflife eval: error: {exc}; install the eval extra: pip install 'halflife[eval]'") from None
    from halflife.datasets.interactions import DatasetError

    logging.basicConfig(level="WARNING")
    try:
        with sigterm_unwinds():
            run(args.data, args.model_dir, args.out, args.cache_dir, target=args.target, config_out=args.write_config)
    except BrokenPipeError:  # stdout's reader left: not an error of the run (see main)
        raise
    except (DatasetError, ManifestError, TargetError, OSError) as exc:
        print(f"halflife eval: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except grpc.RpcError as error:  # the --target server: unreachable at the start, or failing during the run
        return _rpc_failure("eval", error, args.target, f"--target {args.target}: ")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Flags in full only: argparse took any prefix, and `serve --model-id NAME` (export's flag) set serve's
    # internal --model-identity, whose server then refused its own model as changed since its group started.
    parser_class = functools.partial(argparse.ArgumentParser, allow_abbrev=False)
    parser = parser_class(prog="halflife", description="Halflife: real-time interest recommendations.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=parser_class)
    _add_export(commands)
    _add_serve(commands)
    _add_client_commands(commands)
    _add_loadtest(commands)
    _add_eval(commands)
    _add_reembed(commands)
    _add_vacuum(commands)
    return parser


# glibc serves an allocation above its mmap threshold with its own mapping,
# returned to the OS on free, but raises that threshold (up to 32 MiB) after
# each such free. The server's big NumPy arrays (co-occurrence merges copy
# 24 MB arrays at 3M pairs, on several threads) then come from arenas that
# keep the freed memory. Fixed at 1 MiB: 270 instead of ~610 B of RSS per
# recorded user from 100k to 1M users (bench/ingest.py setup, same machine).
# Fixing it also stops glibc raising its trim threshold (to twice the mmap
# threshold), which then stays at 128 KiB: every Recommend gave the heap top
# back and faulted it in again (at 100k items, the popularity read took 0.54
# instead of 0.17 ms). So the trim threshold is set to twice, as glibc would.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
SERVER_MMAP_THRESHOLD = 1 << 20


def _fix_mmap_threshold() -> bool:
    """True where glibc took both settings."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: nothing to fix
        return False
    return (mallopt(_M_MMAP_THRESHOLD, SERVER_MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, 2 * SERVER_MMAP_THRESHOLD) == 1)


def _raise_open_files_limit() -> int:
    """The soft limit of open files raised to the hard one: each client
    connection is a file, and at a common soft default of 1,024 about that
    many connections (idle ones too) left new clients waiting (an audit).
    Returns the limit now in force."""
    try:
        import resource
    except ImportError:  # not Unix
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # a hard limit the kernel refuses as a soft one (macOS): keep the soft one
            return soft
    return hard


def _uvloop():
    try:
        import uvloop
    except ImportError:  # not installed: Windows, or a trimmed environment
        return None
    return uvloop


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (not on Windows), else
    asyncio's: the loop `serve` runs on (see run_event_loop)."""
    uvloop = _uvloop()
    return uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()


def run_event_loop(main):
    """asyncio.run(main), on `new_event_loop`'s kind of loop. uvloop's loop,
    in C, took the empty RPC's p50 from 0.55 to 0.50 ms and one short
    Embed's from 2.90 to 2.81 ms, and gave c32 Embed 3% more calls/s
    (alternated A/B, 5 rounds each, 2-vCPU AMD EPYC); gRPC's own C core is
    the rest of a call's loop time."""
    try:
        uvloop = _uvloop()
    except BaseException:  # Ctrl-C in the import: `main` never ran ("coroutine was never awaited")
        main.close()
        raise
    return uvloop.run(main) if uvloop else asyncio.run(main)


def _stdout_to_devnull() -> None:
    """After stdout's reader left: Python flushes stdout once more at exit,
    which would fail the same way and print a traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _output_that_cannot_fail() -> None:
    """Prints what the streams can hold: a character outside their encoding
    (PYTHONIOENCODING=ascii, a title's "é") comes out escaped, and a stream
    closed at the start (`>&-`) is /dev/null. Both were tracebacks (an audit)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w"))
        elif hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    _output_that_cannot_fail()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        _one_blas_thread_unless_set()
        _fix_mmap_threshold()
        _raise_open_files_limit()
    command = f"halflife {argv[0]}" if argv and not argv[0].startswith("-") else "halflife"
    try:
        args = build_parser().parse_args(argv)  # imports what the commands need: Ctrl-C may land here too
        args.argv = argv  # `serve --workers N` starts its workers with the same flags
        code = args.run(args)
        sys.stdout.flush()  # here, where a reader that left is caught, not at exit
        return code
    except KeyboardInterrupt:  # Ctrl-C: every command's writes are atomic or idempotent, so a rerun is safe
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `halflife ... | head`: the reader left, as it may; no traceback
        _stdout_to_devnull()
        return 141  # as a shell reports a tool that SIGPIPE ended (128 + 13)


if __name__ == "__main__":
    sys.exit(main())
