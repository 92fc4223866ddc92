"""Command line: ``mirrorcache serve``, ``check-config``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

from mirrorcache.config import Config, ConfigError, load_config, parse_listen
from mirrorcache.log import configure_logging


def _config_path(args: argparse.Namespace) -> str:
    path: str | None = args.config or os.environ.get("MIRRORCACHE_CONFIG")
    if not path:
        raise SystemExit("mirrorcache: no config: pass --config PATH or set MIRRORCACHE_CONFIG")
    return path


def _load(args: argparse.Namespace) -> Config | None:
    """The config named by --config / $MIRRORCACHE_CONFIG, or None after printing why not."""
    try:
        return load_config(_config_path(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _fs_only(config: Config | None, command: str) -> Config | None:
    """``config`` if its storage is the filesystem backend, else None after saying why."""
    if config is not None and config.storage.filesystem is None:
        print(f"mirrorcache {command} works on the filesystem backend only; storage.s3 is "
              "set (the S3 backend verifies each blob's digest before it completes the "
              "upload, and the bucket's lifecycle rules handle eviction)", file=sys.stderr)
        return None
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from mirrorcache.server import serve

    config = _load(args)
    if config is None:
        return 1
    if args.listen:
        host, port = parse_listen(args.listen)
        config = replace(config, listen_host=host, listen_port=port)
    if args.workers is not None:
        config = replace(config, workers=args.workers)
    return serve(config)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    print(f"ok: {len(config.upstreams)} upstreams ({', '.join(sorted(config.upstreams))}), "
          f"listening on {config.listen_host}:{config.listen_port}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import asyncio

    from mirrorcache.storage.fs import FilesystemBlobStore
    from mirrorcache.verify import verify_store

    config = _fs_only(_load(args), "verify")
    if config is None:
        return 1
    configure_logging(config.log.level, "json" if config.log.format == "json" else "console")
    store = FilesystemBlobStore(config.storage.fs_path)
    report = asyncio.run(verify_store(store, repair=args.repair))
    for digest in report.bad:
        print(f"{'removed' if digest in report.removed else 'corrupt'} {digest}")
    print(f"checked {report.checked} blobs ({report.bytes} bytes): {len(report.bad)} corrupt"
          + (f", {len(report.removed)} removed" if args.repair else ""))
    return 1 if report.bad and not args.repair else 0


def cmd_gc(args: argparse.Namespace) -> int:
    from mirrorcache.lifecycle.commands import run_gc

    config = _fs_only(_load(args), "gc")
    if config is None:
        return 1
    configure_logging(config.log.level, "json" if config.log.format == "json" else "console")
    return run_gc(config, dry_run=args.dry_run, out=print)


def cmd_inventory(args: argparse.Namespace) -> int:
    from mirrorcache.lifecycle.commands import inventory_rows, render_inventory

    config = _fs_only(_load(args), "inventory")
    if config is None:
        return 1
    try:
        rows = inventory_rows(config, pattern=args.filter, sort=args.sort)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = render_inventory(rows, as_json=args.json, tty=sys.stdout.isatty())
    if text:
        print(text)
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    from mirrorcache.lifecycle.commands import pin

    config = _load(args)
    if config is None:
        return 1
    remove = args.command == "unpin"
    try:
        changed, text = pin(config, args.reference, remove=remove)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verb = "unpinned" if remove else "pinned"
    print(f"{verb} {text}" if changed else f"{text} was {'not ' if remove else 'already '}"
          "pinned")
    return 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    """Print the decision for one image reference and the rule that made it."""
    from mirrorcache.auth.identity import Identity
    from mirrorcache.errors import OCIError
    from mirrorcache.policy import load_policy_file
    from mirrorcache.proxy.routing import Router

    try:
        config = load_config(_config_path(args))
        policy = (load_policy_file(args.policy_file) if args.policy_file
                  else config.policy.policy)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    name, tag = split_image_reference(args.reference)
    try:
        target = Router(config.upstreams, config.default_upstream).resolve(name)
    except OCIError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    identity = None
    if args.user:
        groups = {g for g, members in config.auth.groups.items() if args.user in members}
        identity = Identity(args.user, frozenset(groups) | frozenset(args.group))
    decision = policy.decide(identity, target.upstream, target.repository, tag,
                             auth_enabled=config.auth.enabled)
    who = identity.name if identity else "anonymous"
    what = f"{target}:{tag}" if tag else f"{target} (by digest)"
    print(f"{'allow' if decision.allowed else 'deny'} {what} for {who}: {decision.reason}")
    return 0 if decision.allowed else 1


def cmd_cluster_status(args: argparse.Namespace) -> int:
    """Members, their health, and the owner of a digest or reference (exit 1 if any member
    is unhealthy)."""
    from mirrorcache.cluster.status import run

    config = _load(args)
    if config is None:
        return 2
    return run(config, args.what, args.json)


def split_image_reference(ref: str) -> tuple[str, str | None]:
    """``name[:tag][@digest]`` -> (name, tag); a digest reference yields tag None."""
    name = ref.split("@", 1)[0]
    if "@" in ref:
        return name.rsplit(":", 1)[0] if name.rfind(":") > name.rfind("/") else name, None
    if name.rfind(":") > name.rfind("/"):
        name, tag = name.rsplit(":", 1)
        return name, tag
    return name, "latest"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirrorcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the mirror")
    serve.add_argument("--config", help="config file (default: $MIRRORCACHE_CONFIG)")
    serve.add_argument("--listen", help="HOST:PORT, overrides the config's listen")
    serve.add_argument("--workers", type=int, help="processes serving the port (default: "
                       "the config's workers, 1)")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)
    verify = sub.add_parser("verify", help="re-hash the cache; --repair removes corrupt blobs")
    verify.add_argument("--config", help="config file (default: $MIRRORCACHE_CONFIG)")
    verify.add_argument("--repair", action="store_true", help="delete blobs that do not match")
    verify.set_defaults(func=cmd_verify)
    gc = sub.add_parser("gc", help="evict least recently pulled images now (down to the low "
                        "watermark), printing each")
    gc.add_argument("--config", help="config file (default: $MIRRORCACHE_CONFIG)")
    gc.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    gc.set_defaults(func=cmd_gc)
    inv = sub.add_parser("inventory", help="list cached images: reference, digest, size, "
                         "last pulled, pulls, pinned")
    inv.add_argument("--config", help="config file (default: $MIRRORCACHE_CONFIG)")
    inv.add_argument("--json", action="store_true", help="JSON instead of a table")
    inv.add_argument("--filter", help="only references matching this glob, e.g. "
                     "'docker.io/library/*' or 'docker.io/**:3.12*'")
    inv.add_argument("--sort", default="last-pulled",
                     choices=("last-pulled", "size", "pulls", "name"))
    inv.set_defaults(func=cmd_inventory)
    for name, what in (("pin", "never evict"), ("unpin", "stop pinning")):
        p = sub.add_parser(name, help=f"{what} an image reference or glob")
        p.add_argument("reference", help="e.g. python:3.12, docker.io/library/python:3.12*, "
                       "quay.io/org/app@sha256:...")
        p.add_argument("--config", help="config file (default: $MIRRORCACHE_CONFIG)")
        p.set_defaults(func=cmd_pin)
    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    ptest = policy_sub.add_parser(
        "test", help="show whether an image may be pulled, and which rule decides",
        description="Exit status: 0 allowed, 1 denied, 2 error.")
    ptest.add_argument("reference", help="e.g. docker.io/library/alpine:3.19, alpine, "
                       "quay.io/org/app@sha256:...")
    ptest.add_argument("--config", help="config file (default: $MIRRORCACHE_CONFIG)")
    ptest.add_argument("--policy-file", help="test this policy file instead of the config's")
    ptest.add_argument("--user", help="decide for this authenticated user (default: anonymous)")
    ptest.add_argument("--group", action="append", default=[],
                       help="extra group for --user (groups from auth.groups are added)")
    ptest.set_defaults(func=cmd_policy_test)
    cluster = sub.add_parser("cluster", help="cluster tools")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    cstatus = cluster_sub.add_parser(
        "status", help="members seen, their health, and who owns a digest or reference",
        description="Exit status: 0 all members healthy, 1 some unhealthy, 2 error.")
    cstatus.add_argument("what", nargs="?", help="a digest (sha256:...) or an image "
                         "reference (alpine:3.19, quay.io/org/app@sha256:...)")
    cstatus.add_argument("--config", help="config file (default: $MIRRORCACHE_CONFIG)")
    cstatus.add_argument("--json", action="store_true", help="JSON instead of text")
    cstatus.set_defaults(func=cmd_cluster_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
