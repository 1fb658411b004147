"""The kvstore command line: serve, stats, config, bench, demo.

Exit codes: 0 success; 1 runtime failure (daemon unreachable, another daemon on the socket, a
port in use); 2 bad usage or configuration, including a configured path or size the daemon finds
unusable at start-up (kvstore.daemon.server raises ConfigError for those). A reader closing the pipe
(`kvstore stats --watch 1 | head`) ends a command quietly with 0.

serve and config take every configuration key as a flag; the client commands (stats, health)
take only what they use to find and talk to the daemon.

Usage errors exit 2 with the (sub)command's usage: bare ``kvstore`` prints the help; an unknown
command or option names the nearest known one; no parser here or in the benchmarks accepts a
prefix of an option (``allow_abbrev=False``; tests/daemon/test_cli.py checks every parser).
"""
from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import logging
import os
import signal
import sys

from kvstore import __version__
from kvstore.daemon.config import FIELDS, ConfigError, flag_name, load_config, user_fields


class _Parser(argparse.ArgumentParser):
    """argparse as the CLI wants it everywhere: prefix abbreviations off (``--dram-byte`` is an
    error, never a silent ``--dram-bytes``: a later flag could make the prefix ambiguous), and
    an unknown option answered by this (sub)command's usage with the nearest known option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        self.option_names: list[str] = []          # set before argparse adds --help
        self.commands: dict[str, _Parser] = {}     # subcommand -> its parser (build_parser)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        self.option_names += [a for a in args if a.startswith("--")]
        return super().add_argument(*args, **kwargs)

    def unknown_options(self, extras: list[str]) -> None:
        """Exit 2 with this parser's usage, naming the first unknown argument and, for an
        option, the known one it most likely meant."""
        bad = extras[0]
        hint = ""
        if bad.startswith("-"):
            near = difflib.get_close_matches(bad.split("=", 1)[0], self.option_names, n=1,
                                             cutoff=0.6)
            if near:
                hint = f" (did you mean {near[0]}?)"
        self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """Every configuration key as a flag: for the commands that build a daemon's configuration
    (serve, config). The client commands take only --config and --socket. Internal keys have
    no flag (kvstore.daemon.config.Field.internal)."""
    p.add_argument("--config", help="TOML configuration file")
    for f in user_fields():
        p.add_argument(flag_name(f), dest=f.name, default=None, help=f.help)


def _add_socket_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file (for its socket)")
    p.add_argument("--socket", help="the daemon's Unix socket (default: the configuration's: "
                                    "--config, $KVSTORE_SOCKET, else the default path)")


def _overrides(args) -> dict:
    return {f.name: getattr(args, f.name, None) for f in FIELDS if not f.internal}


def run_loop(main, event_loop: str):
    """Run ``main`` on the configured event loop (event_loop: auto, uvloop, asyncio)."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                main.close()
                raise ConfigError("event_loop = uvloop, but uvloop is not installed "
                                  "(pip install uvloop)") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def cmd_serve(args) -> int:
    from kvstore.daemon.server import DaemonError, run_daemon
    from kvstore.core.arena import ArenaError

    cfg = load_config(args.config, overrides=_overrides(args))
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_loop(run_daemon(cfg), cfg.event_loop)
    except (DaemonError, ArenaError, OSError) as exc:
        print(f"kvstore serve: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_config(args) -> int:
    """The configuration a new daemon would start with here (defaults, file, environment,
    flags). Not a running daemon's: that one keeps what it started with. --reference: the
    generated reference page (kvstore.daemon.reference) instead."""
    if args.reference:
        from kvstore.daemon import reference
        if not args.write:
            sys.stdout.write(reference.render_markdown())
            return 0
        changed = reference.write()
        print("rewrote " + ", ".join(changed) if changed else "up to date: "
              f"{reference.DOC_PATH}, {reference.CONFIG_PATH}")
        return 0
    if args.write:
        print("kvstore config: --write goes with --reference", file=sys.stderr)
        return 2
    cfg = load_config(args.config, overrides=_overrides(args))
    if args.json:
        print(json.dumps(cfg.as_dict(), indent=2))
        return 0
    rows = cfg.describe()
    print("# the configuration `kvstore serve` would start with here (defaults <- file <- "
          "$KVSTORE_* <- flags);\n# a running daemon keeps the one it started with")
    from kvstore.daemon.server import socket_answers
    if socket_answers(cfg.socket):
        print(f"# a daemon is listening on {cfg.socket}: `kvstore stats` shows what it holds")
    w = max(len(k) for k, _, _ in rows)
    for k, v, src in rows:
        print(f"{k:<{w}}  {v:<28}  ({src})")
    return 0


def cmd_stats(args) -> int:
    from kvstore.client import KVClient, KVStoreError
    from kvstore.metrics.table import render_table, stats_to_dict

    cfg = load_config(args.config, overrides=_overrides(args))
    if args.watch is not None and not args.watch >= 0.05:
        print("kvstore stats: --watch SECONDS must be >= 0.05", file=sys.stderr)
        return 2
    token = os.environ.get("KVSTORE_AUTH_TOKEN") or None
    if args.token_file:
        try:
            token = open(args.token_file).read().strip()
        except OSError as exc:
            print(f"kvstore stats: --token-file {args.token_file}: {exc.strerror}",
                  file=sys.stderr)
            return 2
    try:
        client = KVClient(cfg.socket, address=args.address, timeout_s=args.timeout,
                          shared_memory=False, client_name="kvstore-stats", token=token,
                          tls_ca_file=args.tls_ca, tls_server_name=args.tls_server_name)
    except KVStoreError as exc:     # unreachable: the SDK's message names the socket or address
        print(f"kvstore stats: {exc}", file=sys.stderr)
        return 1
    tty = sys.stdout.isatty() and bool(args.watch) and not args.json
    if tty:
        sys.stdout.write("\x1b[?1049h")   # the alternate screen, like top; restored on exit
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))   # ... on SIGTERM too
    try:
        snapshots = client.watch_stats(args.watch) if args.watch else [client.stats()]
        for snapshot in snapshots:
            st = snapshot.proto
            if args.json:
                # One document per line under --watch (NDJSON), pretty otherwise.
                print(json.dumps(stats_to_dict(st, buckets=args.buckets),
                                 indent=None if args.watch else 2))
            elif tty:
                # Like top: redraw in place (home, each line cleared, rest of screen cleared).
                sys.stdout.write("\x1b[H" + "".join(line + "\x1b[K\n"
                                                    for line in render_table(st).splitlines())
                                 + "\x1b[J")
            else:
                print(render_table(st) + ("\n" if args.watch else ""))
            sys.stdout.flush()
        return 0
    except KVStoreError as exc:
        print(f"kvstore stats: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if tty:
            sys.stdout.write("\x1b[?1049l")
            sys.stdout.flush()
        client.close()


def cmd_health(args) -> int:
    """Exit 0 when the daemon answers SERVING to grpc.health.v1 (for Docker HEALTHCHECK and exec
    probes; Kubernetes can also probe the TCP port with its built-in gRPC probe)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cfg = load_config(args.config, overrides=_overrides(args))
    target = args.address or f"unix:{cfg.socket}"
    try:
        with grpc.insecure_channel(target) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            from kvstore.client.sdk import unreachable_message
            # The status name stays, in brackets: probes and scripts match on it.
            print(f"kvstore health: {unreachable_message(target, args.timeout)} "
                  f"[{exc.code().name}]", file=sys.stderr)
        else:
            print(f"kvstore health: {target}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    print(status)
    return 0 if r.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_bench(args) -> int:
    from kvstore.bench import main as bench_main
    return bench_main(args.bench_args)


def cmd_demo(args) -> int:
    from kvstore.bench.demo import main as demo_main
    return demo_main(args.demo_args)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="kvstore", description="Tiered KV-cache daemon for LLM inference")
    ap.add_argument("--version", action="version", version=f"kvstore {__version__}",
                    help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ap.commands = sub.choices

    p = sub.add_parser("serve", help="run the daemon")
    _add_config_flags(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("stats", help="show tier statistics of a running daemon")
    _add_socket_flags(p)
    p.add_argument("--address", help="TCP host:port instead of the Unix socket")
    p.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    p.add_argument("--buckets", action="store_true", help="with --json: include the latency "
                   "histograms' buckets (left out by default; /metrics has them too)")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="give up reaching the daemon after SECONDS (default 5)")
    p.add_argument("--token-file", help="bearer token for a TCP daemon (else $KVSTORE_AUTH_TOKEN)")
    p.add_argument("--tls-ca", help="PEM certificate to trust for a TLS daemon")
    p.add_argument("--tls-server-name", help="name to check in the daemon's certificate")
    p.set_defaults(fn=cmd_stats)

    p = sub.add_parser("health", help="check that the daemon is serving (exit 0) or not (1)")
    _add_socket_flags(p)
    p.add_argument("--address", help="TCP host:port (plaintext) instead of the Unix socket")
    p.add_argument("--service", default="", help="service name to check ('' = the daemon)")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                   help="give up after SECONDS (default 3)")
    p.set_defaults(fn=cmd_health)

    p = sub.add_parser("config", help="show the configuration a new daemon would start with "
                                      "(not a running daemon's)")
    _add_config_flags(p)
    p.add_argument("--print", action="store_true", default=True,
                   help="a table of each key, its value and where it came from (the default)")
    p.add_argument("--json", action="store_true", help="the values as JSON, numbers as numbers")
    p.add_argument("--reference", action="store_true", help="the configuration reference "
                   "(Markdown, every key of the daemon and the adapters), generated from the code")
    p.add_argument("--write", action="store_true", help="with --reference: rewrite "
                   "docs/configuration.md and Config's typed block in this checkout")
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("bench", help="benchmarks (kvstore bench --help)", add_help=False,
                       prefix_chars="\x00")  # --help and every --flag go to the benchmark
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("demo", help="watch a cached prefix cut time to first token (kvstore "
                                    "demo --help)", add_help=False,
                       prefix_chars="\x00")  # every argument, --flags too, goes to the demo
    p.add_argument("demo_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmarks parse their own options, --help included
        from kvstore.bench import main as bench_main
        return bench_main(argv[1:])
    ap = build_parser()
    if not argv:               # bare `kvstore`: what it can do, rather than "cmd is required"
        ap.print_help(sys.stderr)
        return 2
    commands = ap.commands
    if not argv[0].startswith("-") and argv[0] not in commands:
        near = difflib.get_close_matches(argv[0], list(commands), n=1, cutoff=0.6)
        ap.error(f"unknown command {argv[0]!r}"
                 + (f" (did you mean {near[0]}?)" if near else f"; commands: "
                    f"{', '.join(commands)}"))
    args, extras = ap.parse_known_args(argv)
    if extras:                 # the subcommand's own usage and suggestion, not the top level's
        commands[args.cmd].unknown_options(extras)
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"kvstore {args.cmd}: configuration error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`kvstore stats --watch 1 | head`): stop quietly, like a filter.
        # stdout now points at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
