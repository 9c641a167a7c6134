"""The ``csi-kit`` command: thin — it builds a configuration and calls the public API.

Every ``serve`` flag also reads an environment variable (``CSI_KIT_<FLAG>``),
so a DaemonSet can configure the driver without a command line.

An ordinary mistake — a bad flag or option, an unknown backend, a backend
that fails to start, a busy port or state directory, a store that would be
forgotten — ends in one ``csi-kit: ...`` line on stderr and exit status 2,
never a traceback; ``--log-level debug`` also logs the traceback of its cause.
``csi-kit store rebuild`` is the recovery for a missing or unreadable store
(docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import attrs

from csi_kit._version import __version__
from csi_kit.errors import CSIError, InvalidArgument

__all__ = ["main", "build_parser"]


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CSI_KIT_{name}", default)


def _default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/csi-kit"
    return os.path.join(os.path.expanduser("~"), ".local", "share", "csi-kit")


def _parse_options(values: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        for part in item.split():
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise InvalidArgument(f"backend option {part!r} is not KEY=VALUE")
            out[key] = value
    return out


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _octal(value: str) -> int:
    try:
        return int(value, 8)
    except ValueError:
        raise InvalidArgument(f"socket mode {value!r} is not an octal mode such as 0600") from None


def _backend_args(p: argparse.ArgumentParser) -> None:
    """The flags that say which backend, with which options, on which state directory."""
    p.add_argument("--backend", default=_env("BACKEND", "hostpath"), help="backend name (csi-kit backends)")
    p.add_argument(
        "--backend-option",
        action="append",
        default=[_env("BACKEND_OPTIONS", "")] if _env("BACKEND_OPTIONS", "") else [],
        metavar="KEY=VALUE",
        help="backend configuration, repeatable (env CSI_KIT_BACKEND_OPTIONS: space-separated)",
    )
    p.add_argument("--node-id", default=_env("NODE_ID", os.uname().nodename))
    p.add_argument(
        "--driver-name",
        default=_env("DRIVER_NAME", ""),
        help="CSI driver name (default: BACKEND.csi-kit.io, e.g. hostpath.csi-kit.io)",
    )
    p.add_argument("--state-dir", default=_env("STATE_DIR", _default_state_dir()))
    p.add_argument("--log-level", type=str.lower, choices=_LOG_LEVELS, default=_env("LOG_LEVEL", "info"))
    p.add_argument("--log-format", choices=["text", "json"], default=_env("LOG_FORMAT", "text"))


def _add_serve(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="serve a CSI driver with a backend")
    _backend_args(p)
    p.add_argument(
        "--endpoint",
        action="append",
        default=None,
        help="unix:///path/csi.sock or host:port, repeatable (default unix://STATE_DIR/csi.sock)",
    )
    p.add_argument("--mode", choices=["all", "controller", "node"], default=_env("MODE", "all"))
    # String defaults go through `type` too: a bad CSI_KIT_* value is a usage error, not a traceback.
    p.add_argument("--workers", type=int, default=_env("WORKERS", "16"))
    p.add_argument("--metrics-address", default=_env("METRICS_ADDRESS", ""), help="host:port for Prometheus")
    p.add_argument(
        "--socket-mode",
        default=_env("SOCKET_MODE", "0600"),
        help="octal mode of the unix socket",
    )
    p.add_argument("--drain-seconds", type=float, default=_env("DRAIN_SECONDS", "30"))
    p.add_argument(
        "--durability",
        choices=["power", "process"],
        default=_env("DURABILITY", "power"),
        help="what an acknowledged change survives: power (flushed to disk before the answer) "
        "or process (a killed driver, not a power cut; faster)",
    )
    _k8s_options(p)


def _add_store(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("store", help="recover a driver's state store (docs/operations.md)")
    commands = p.add_subparsers(dest="store_command", metavar="STORE_COMMAND")
    rebuild = commands.add_parser(
        "rebuild",
        help="move a missing, empty or unreadable store aside and record what the backend still holds",
        description=(
            "Run with the driver stopped and the same backend flags it serves with.  A missing, empty or "
            "unreadable store is moved aside (never deleted); every volume and snapshot id the backend "
            "reports without a record is recorded as ready, named recovered-<id>, size unknown (0)."
        ),
    )
    _backend_args(rebuild)
    rebuild.add_argument(
        "--access-type",
        choices=["mount", "block"],
        default=None,
        help="what the recovered volumes are, for a backend that serves both",
    )


def _k8s_options(p: argparse.ArgumentParser) -> None:
    try:
        from csi_kit.k8s.cli import add_controller_options
    except ImportError:
        return
    add_controller_options(p)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """End every option's --help line with its default (the environment's, when set), in every subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _show_defaults(subparser)
            continue
        default, text = action.default, action.help or ""
        if not action.option_strings or text == argparse.SUPPRESS or "default" in text:
            continue
        if default is None or default is False or default is argparse.SUPPRESS or default in ("", []):
            continue
        action.help = f"{text} (default: %(default)s)".strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csi-kit", description="CSI drivers in Python")
    parser.add_argument("--version", action="version", version=f"csi-kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    _add_store(sub)
    sub.add_parser("backends", help="list installed backends")
    sanity = sub.add_parser("sanity", help="run the conformance suite against a CSI endpoint", add_help=False)
    sanity.add_argument("args", nargs=argparse.REMAINDER)
    call = sub.add_parser("call", help="call one CSI RPC on a driver endpoint", add_help=False)
    call.add_argument("args", nargs=argparse.REMAINDER)
    ctl = sub.add_parser("controllers", help="run the Kubernetes controller loops against a CSI driver")
    ctl.add_argument("--csi-address", default=_env("CSI_ADDRESS", "unix:///run/csi-kit/csi.sock"))
    ctl.add_argument("--log-level", type=str.lower, choices=_LOG_LEVELS, default=_env("LOG_LEVEL", "info"))
    ctl.add_argument("--log-format", choices=["text", "json"], default=_env("LOG_FORMAT", "text"))
    _k8s_options(ctl)
    ctl.add_argument(
        "--metrics-address",
        default=_env("METRICS_ADDRESS", ""),
        help="host:port to serve the loops' Prometheus metrics on (docs/metrics.md); off when empty",
    )
    ctl.set_defaults(controllers=_env("CONTROLLERS", "snapshot"), serve_loop_metrics=True)
    _show_defaults(parser)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from csi_kit.driver import Driver, DriverConfig
    from csi_kit.log import setup_logging

    setup_logging(args.log_level, args.log_format)
    endpoints = args.endpoint or [_env("ENDPOINT", f"unix://{os.path.join(args.state_dir, 'csi.sock')}")]
    config = DriverConfig(
        backend=args.backend,
        backend_options=_parse_options(args.backend_option),
        driver_name=args.driver_name or f"{args.backend}.csi-kit.io",
        node_id=args.node_id,
        endpoints=tuple(endpoints),
        state_dir=args.state_dir,
        mode=args.mode,
        workers=args.workers,
        metrics_address=args.metrics_address,
        socket_mode=_octal(args.socket_mode),
        drain_seconds=args.drain_seconds,
        durability=args.durability,
    )
    controllers = getattr(args, "controllers", "") or ""
    if controllers:
        from csi_kit.k8s.cli import selected

        try:
            selected(args)  # a bad --controllers fails before anything is served
        except ValueError as e:
            print(f"csi-kit: {e}", file=sys.stderr)
            return 2
    driver = Driver(config)

    async def main() -> int:
        stop = asyncio.Event()
        tasks = []
        if controllers:
            from csi_kit.k8s.cli import run_controllers

            async def loops() -> None:
                while driver.server is None:
                    await asyncio.sleep(0.05)
                await run_controllers(args, str(driver.endpoints[0]), stop)

            def loops_done(task: asyncio.Task[None]) -> None:
                # The loops are part of the driver: if they fail, say so and stop serving.
                if not task.cancelled() and task.exception() is not None:
                    logging.getLogger("csi_kit.cli").error(
                        "controller loops failed; stopping", exc_info=task.exception()
                    )
                    stop.set()

            task = asyncio.create_task(loops())
            task.add_done_callback(loops_done)
            tasks.append(task)
        serving = asyncio.create_task(driver.serve_until_signalled(stop))
        while driver.server is None and not serving.done():
            await asyncio.sleep(0.02)
        if driver.server is not None:
            where = ", ".join(str(e) for e in driver.server.endpoints)
            print(f"csi-kit: {config.driver_name} ({config.backend}) listening on {where}", flush=True)
            print(f"csi-kit: state in {config.state_dir}; stop with Ctrl-C", flush=True)
        await serving
        failed = False
        for t in tasks:
            try:
                await t
            except Exception:  # already logged by loops_done
                failed = True
        return 1 if failed else 0

    return asyncio.run(main())


def _store(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from csi_kit.driver import DriverConfig, rebuild_store
    from csi_kit.log import setup_logging

    if args.store_command != "rebuild":
        parser.parse_args(["store", "--help"])
        return 2
    setup_logging(args.log_level, args.log_format)
    config = DriverConfig(
        backend=args.backend,
        backend_options=_parse_options(args.backend_option),
        driver_name=args.driver_name or f"{args.backend}.csi-kit.io",
        node_id=args.node_id,
        state_dir=args.state_dir,
    )
    report = rebuild_store(config, access_type=args.access_type)
    if report.problem:
        aside = ", ".join(report.moved_aside) or "nothing to move"
        print(f"csi-kit: {report.problem}; set aside: {aside}")
    found = len(report.volumes) + len(report.snapshots)
    if found:
        print(
            f"csi-kit: recorded {len(report.volumes)} volume(s) and {len(report.snapshots)} snapshot(s) "
            f"the {config.backend} backend holds, as ready (named recovered-<id>; sizes and snapshot "
            "sources unknown)"
        )
    else:
        print(f"csi-kit: the store records everything the {config.backend} backend holds")
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).splitlines())


def _backends() -> int:
    from csi_kit.backend import capabilities_of
    from csi_kit.plugin.manager import load_registry

    registry = load_registry()
    for entry in registry.entries():
        can = [name for name, ok in attrs.asdict(capabilities_of(entry.backend)).items() if ok]
        print(f"{entry.name}\t{entry.backend.__module__}.{entry.backend.__qualname__}\t(from {entry.plugin})")
        print(f"\tcan: {', '.join(can)}")
        print(f"\taccess: {', '.join(sorted(entry.backend.access_types))}")
    return 0


def _controllers(args: argparse.Namespace) -> int:
    from csi_kit.log import setup_logging

    try:
        from csi_kit.k8s.cli import run_controllers, selected
    except ImportError:
        print("csi-kit: the Kubernetes loops are not available in this build", file=sys.stderr)
        return 2
    try:
        selected(args)  # a bad --controllers ends in one line, before anything starts
    except ValueError as e:
        print(f"csi-kit: {e}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, args.log_format)

    async def main() -> None:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_controllers(args, args.csi_address, stop)

    try:
        asyncio.run(main())
    except ValueError as e:  # a loop's options that do not fit together (e.g. per-node without a node)
        print(f"csi-kit: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sanity":
        from csi_kit.testing.sanity.cli import main as sanity_main

        return sanity_main(argv[1:])
    if argv and argv[0] == "call":
        from csi_kit.call import main as call_main

        return call_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in (None, "serve"):
            if args.command is None:
                args = parser.parse_args(["serve", *argv])
            return _serve(args)
        if args.command == "store":
            return _store(args, parser)
        if args.command == "backends":
            return _backends()
        if args.command == "controllers":
            return _controllers(args)
    except CSIError as e:
        logging.getLogger("csi_kit.cli").debug("%s failed", args.command or "serve", exc_info=True)
        print(f"csi-kit: {_one_line(e)}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
