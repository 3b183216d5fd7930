"""`kiln serve`: its flags and its run (the CLI module and ``python -m kiln.serve`` both call these)."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys

from kiln.errors import KilnError

EVENT_LOOPS = ("auto", "asyncio", "uvloop")    # --event-loop: the front-end processes' event loop


def _whole(low: int):
    """An argparse type: a whole number of at least ``low``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {low}")
        return v
    return parse


_positive_int, _count = _whole(1), _whole(0)


def _port(text: str) -> int | None:
    if text == "off":
        return None
    v = _count(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0..65535, or off)")
    return v


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(t) for t in text.split(",") if t.strip())


def _mb(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB") from None
    if not 0 < v < 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of MiB")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `kiln serve` flags."""
    parser.add_argument("path", help="a folder of MODEL.kiln engines (each served as MODEL) or one engine file")
    net = parser.add_argument_group("listening")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                                                          "only; 0.0.0.0 for every interface)")
    net.add_argument("--http-port", type=_port, default=8000, metavar="PORT",
                     help="KServe v2 HTTP/REST port (default 8000; 0 picks a free one; off)")
    net.add_argument("--grpc-port", type=_port, default=8001, metavar="PORT",
                     help="KServe v2 gRPC port (default 8001; 0 picks a free one; off)")
    net.add_argument("--max-request-mb", type=_mb, default=64.0, metavar="MB",
                     help="largest request body accepted, in MiB (default 64); larger ones get 413 / "
                          "RESOURCE_EXHAUSTED")
    net.add_argument("--system-shm", choices=("local", "any", "off"), default="local",
                     help="who may pass tensors in POSIX shared memory (the system shared-memory extension): "
                          "clients on loopback addresses (local, the default), any client, or none")
    net.add_argument("--frontends", type=_positive_int, default=1, metavar="N",
                     help="processes that accept HTTP and gRPC on the same ports (SO_REUSEPORT) and do the protocol "
                          "work, passing tensors to the one engine process through shared memory (default 1: "
                          "one process does everything)")
    net.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                     help="the front-end processes' event loop with --frontends N: uvloop where it is installed "
                          "(auto, the default), asyncio's own, or uvloop (refused when not installed)")
    b = parser.add_argument_group("dynamic batching")
    b.add_argument("--max-batch", type=_positive_int, metavar="N",
                   help="most rows per merged batch (default: the engine's largest profile batch)")
    b.add_argument("--max-queue-delay-us", type=_count, default=0, metavar="US",
                   help="how long the oldest queued request waits for others to fill its batch (default 0: "
                        "merge only what is already queued)")
    b.add_argument("--preferred-batch-sizes", type=_sizes, default=(), metavar="N,N",
                   help="batch sizes to run at as soon as they are reached")
    b.add_argument("--no-batching", action="store_true", help="run every request on its own")
    b.add_argument("--instances", type=_positive_int, default=1, metavar="N",
                   help="execution contexts per model, each with its own worker and CUDA stream (default 1)")
    b.add_argument("--max-queue", type=_positive_int, default=512, metavar="N",
                   help="queued requests per model before new ones get 503 / UNAVAILABLE (default 512)")
    b.add_argument("--batch-buckets", choices=("auto", "on", "off"), default="auto",
                   help="merge into batches of power-of-two rows (and --max-batch) only, so a GPU engine replays a "
                        "few CUDA graphs instead of recording one per size (auto: on for GPU engines)")
    b.add_argument("--warmup", action="store_true",
                   help="run every batch size once per instance before serving (captures the CUDA graphs up front)")
    b.add_argument("--timeout-ms", type=_positive_int, default=60000, metavar="MS",
                   help="longest a request may queue and run (default 60000); a request may ask for less")
    o = parser.add_argument_group("logging")
    o.add_argument("--access-log", metavar="FILE", help="write one JSON line per request to FILE ('-': stderr)")
    o.add_argument("--verbose", action="store_true", help="log every batch formed (and the access log to stderr "
                                                          "unless --access-log)")


def setup_logging(args: argparse.Namespace) -> None:
    """The kiln.serve loggers as --verbose and --access-log ask (``args`` needs those two attributes)."""
    base = logging.getLogger("kiln.serve")
    base.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kiln serve: %(message)s"))
    base.addHandler(handler)
    base.propagate = False
    access = logging.getLogger("kiln.serve.access")
    access.propagate = False
    target = args.access_log or ("-" if args.verbose else None)
    if target is None:
        access.setLevel(logging.WARNING)
        return
    try:
        out = logging.StreamHandler(sys.stderr) if target == "-" else logging.FileHandler(target, encoding="utf-8")
    except OSError as exc:
        raise KilnError(f"Cannot open the access log {target!r} ({exc.strerror or exc}); check the path.") from None
    out.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(out)
    access.setLevel(logging.INFO)


def config_from_args(args: argparse.Namespace):
    """The ServeConfig the flags ask for."""
    from kiln.serve.model import ModelOptions
    from kiln.serve.server import ServeConfig
    options = ModelOptions(batching=not args.no_batching, max_batch=args.max_batch,
                           max_queue_delay_us=args.max_queue_delay_us,
                           preferred_batch_sizes=tuple(args.preferred_batch_sizes), instances=args.instances,
                           max_queue=args.max_queue, timeout_ms=float(args.timeout_ms),
                           warmup=args.warmup, buckets=args.batch_buckets)
    return ServeConfig(path=args.path, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                       max_request_mb=args.max_request_mb, system_shm=args.system_shm, model=options,
                       frontends=args.frontends, access_log=args.access_log, verbose=args.verbose,
                       event_loop=args.event_loop)


def run(args: argparse.Namespace) -> int:
    """Serves until Ctrl-C or SIGTERM, then drains: requests already taken are answered, then it exits."""
    import asyncio

    if not os.path.exists(args.path):
        raise KilnError(f"{args.path!r} does not exist; give a folder of .kiln engines or one engine file.")
    needs = [("aiohttp", "HTTP")] * (args.http_port is not None) + [("grpc", "gRPC")] * (args.grpc_port is not None)
    for module, what in needs:
        try:
            __import__(module)
        except ImportError:
            raise KilnError(f"kiln serve needs {module} for {what}: pip install 'kiln[serve]'.") from None
    if args.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise KilnError("--event-loop uvloop needs the uvloop package: pip install uvloop, or use --event-loop "
                        "asyncio.")
    config = config_from_args(args)
    setup_logging(args)

    async def main() -> None:
        from kiln.serve.server import serve
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = {"n": 0}

        def on_signal() -> None:
            signals["n"] += 1
            if signals["n"] > 1:
                print("kiln serve: second interrupt, exiting without draining", file=sys.stderr, flush=True)
                os._exit(130)
            stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)

        await serve(config, stop, lambda at: print(at.line(), flush=True))

    asyncio.run(main())
    print("kiln serve: stopped", flush=True)
    return 0
