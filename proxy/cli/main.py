"""Command line: `canary-proxy run | validate | demo | status | promote | rollback | ...`.

This is the only module that exits the process; everything else raises.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.config import ConfigError, load_config


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Rollout events are JSON already: one JSON object per line, not JSON inside a text line.
    events = logging.StreamHandler(sys.stderr)
    events.setFormatter(logging.Formatter("%(message)s"))
    rollout_log = logging.getLogger("canary_proxy.rollout")
    rollout_log.addHandler(events)
    rollout_log.propagate = False


def install_uvloop() -> None:
    """Use uvloop when it is importable (it is a hard dependency; this keeps tests flexible)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.control.adminguard import exposure_problem

    try:
        config = load_config(args.config)
        problem = exposure_problem(config)
        if problem is not None:
            raise ConfigError([problem], args.config)
    except ConfigError as exc:
        print(f"canary-proxy: invalid config {args.config}:", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return 1
    from proxy.config.lint import config_warnings

    for warning in config_warnings(config):  # the same warnings as `validate`
        logging.getLogger("canary_proxy").warning("config: %s", warning)
    from proxy.control.workers import WorkerRole, run_workers

    role = None
    if args.worker_index is not None:
        role = WorkerRole(args.worker_index, args.workers, args.control)
    elif args.workers > 1:
        return run_workers(args.config, args.workers, args.log_level)
    from proxy.control.app import ProxyApp

    install_uvloop()

    async def main() -> int:
        app = ProxyApp(config, role=role)
        app.install_signals()  # before start: a signal during start-up must not kill us half-way
        try:
            await app.start()
        except OSError as exc:
            print(f"canary-proxy: cannot listen: {exc}", file=sys.stderr)
            await app.stop()
            return 1
        except ConfigError as exc:
            print(f"canary-proxy: {'; '.join(exc.errors)}", file=sys.stderr)
            await app.stop()
            return 1
        return await app.run_forever()

    return asyncio.run(main())


def cmd_validate(args: argparse.Namespace) -> int:
    from proxy.config.summary import summarize
    from proxy.control.adminguard import exposure_problem

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"canary-proxy: {args.config}: {len(exc.errors)} error(s)", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        print(f"canary-proxy: configuration file {args.config} test failed", file=sys.stderr)
        return 1
    problem = exposure_problem(config)
    if problem is not None:  # the token may come from the environment `run` gets: a warning here
        print(f"canary-proxy: warning: `run` refuses this without a token: {problem}", file=sys.stderr)
    from proxy.config.lint import config_warnings

    print(summarize(config))
    for warning in config_warnings(config):
        print(f"canary-proxy: warning: {warning}", file=sys.stderr)
    print(f"canary-proxy: configuration file {args.config} test is successful")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.cli.demo import run_demo

    install_uvloop()
    return asyncio.run(run_demo(duration=args.duration, keep_running=args.keep_running, port=args.port))


class _Version(argparse.Action):
    """`--version`: the version, then which hot path this installation runs (imports it to know)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object, **__: object) -> None:
        from proxy import native

        print(f"canary-proxy {__version__}\nhot path: {native.state()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canary-proxy", description="A standalone reverse proxy for canary releases."
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and the hot path, then exit")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error (default info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", required=True, help="YAML config file")
    run.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    run.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--control", default="", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a config file, like nginx -t")
    validate.add_argument("-c", "--config", required=True, help="YAML config file")
    validate.set_defaults(func=cmd_validate)

    demo = sub.add_parser("demo", help="run a self-contained demo: two upstreams, the proxy and traffic")
    demo.add_argument("--keep-running", action="store_true", help="stay up after the traffic run")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds of traffic (default 30)")
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080; 0 = any free)")
    demo.set_defaults(func=cmd_demo)

    try:
        from proxy.cli.admin import add_admin_commands
    except ImportError:  # pragma: no cover - during development only
        pass
    else:
        add_admin_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `canary-proxy` and `python -m proxy`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code
