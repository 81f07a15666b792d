"""Prepare one process of a multi-process `bytewax.run` cluster, as a Kubernetes
StatefulSet pod's init container does: `python -m flows.cluster`.

It writes the hostfile `bytewax.run` reads from `BYTEWAX_HOSTFILE_PATH` (one `host:port`
line per process, in process-id order) and, on process 0 only, initialises the recovery
partitions in `BYTEWAX_RECOVERY_DIRECTORY` when it has none. Every other process starts
with an empty directory: Bytewax needs the cluster as a whole to hold each partition
once, and a process may hold none (see `flows.recovery`).

Process ids come from the pod name the way `bytewax.run` derives them: `BYTEWAX_POD_NAME`
minus `BYTEWAX_STATEFULSET_NAME-` (`operators.workers.pod_process_id`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from flows.recovery import prepare_directory
from operators.workers import RECOVERY_DIRECTORY_ENV, pod_process_id, run_options

DEFAULT_PORT = 2101
DEFAULT_CLUSTER_DOMAIN = "cluster.local"


def peer_addresses(
    statefulset: str,
    replicas: int,
    port: int,
    *,
    service: str | None = None,
    namespace: str | None = None,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
    hosts: Sequence[str] | None = None,
) -> list[str]:
    """`host:port` of every process, in process-id order.

    Pods are reached by their stable DNS names through the headless `service`:
    `<statefulset>-<i>.<service>.<namespace>.svc.<cluster_domain>`. `hosts` replaces those
    names (one per process, `host` or `host:port`), e.g. loopback addresses when every
    process runs on one host.
    """
    if replicas < 1:
        raise ValueError("a cluster needs at least one process")
    if hosts is not None:
        if len(hosts) != replicas:
            raise ValueError(f"{len(hosts)} hosts given for {replicas} processes")
        return [host if ":" in host else f"{host}:{port}" for host in hosts]
    if not service or not namespace:
        raise ValueError("service and namespace are needed to name the pods")
    domain = f"{service}.{namespace}.svc.{cluster_domain}"
    return [f"{statefulset}-{index}.{domain}:{port}" for index in range(replicas)]


def write_hostfile(path: Path, addresses: Sequence[str]) -> None:
    """Write the hostfile `bytewax.run` reads: one address per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{address}\n" for address in addresses))


def _env_int(name: str, default: int | None = None) -> int | None:
    """The whole number in environment variable `name`; one error line and exit 2 if not."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isascii() or not value.isdigit():
        raise SystemExit(f"streamsight: {name}: not a whole number (expected digits, e.g. 3)")
    return int(value)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ
    try:
        recovery_dir = run_options([], env).recovery_directory
    except ValueError as exc:
        raise SystemExit(f"streamsight: {exc}") from None
    parser = argparse.ArgumentParser(
        prog="python -m flows.cluster",
        description="Write the peers hostfile and set up the recovery directory of one "
        "process of a bytewax.run cluster (a StatefulSet pod's init container).",
    )
    parser.add_argument("--pod-name", default=env.get("BYTEWAX_POD_NAME"))
    parser.add_argument("--statefulset", default=env.get("BYTEWAX_STATEFULSET_NAME"))
    parser.add_argument(
        "--replicas",
        type=int,
        default=_env_int("STREAMSIGHT_REPLICAS"),
        help="processes in the cluster (default: STREAMSIGHT_REPLICAS)",
    )
    parser.add_argument("--service", default=env.get("STREAMSIGHT_PEER_SERVICE"))
    parser.add_argument("--namespace", default=env.get("POD_NAMESPACE"))
    parser.add_argument(
        "--cluster-domain",
        default=env.get("STREAMSIGHT_CLUSTER_DOMAIN", DEFAULT_CLUSTER_DOMAIN),
    )
    parser.add_argument("--port", type=int, default=_env_int("STREAMSIGHT_PEER_PORT", DEFAULT_PORT))
    parser.add_argument(
        "--hosts",
        default=None,
        help="comma-separated host or host:port per process, instead of the pods' DNS names",
    )
    parser.add_argument(
        "--hostfile", type=Path, default=env.get("BYTEWAX_HOSTFILE_PATH"), required=False
    )
    parser.add_argument(
        "--recovery-dir",
        type=Path,
        default=recovery_dir,
        help=f"this pod's recovery directory (default: {RECOVERY_DIRECTORY_ENV})",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=_env_int("STREAMSIGHT_RECOVERY_PARTITIONS", 8),
        help="recovery partitions process 0 creates (the maximum worker count)",
    )
    args = parser.parse_args(argv)
    missing = [
        flag
        for flag, value in (
            ("--pod-name/BYTEWAX_POD_NAME", args.pod_name),
            ("--statefulset/BYTEWAX_STATEFULSET_NAME", args.statefulset),
            ("--replicas/STREAMSIGHT_REPLICAS", args.replicas),
            ("--hostfile/BYTEWAX_HOSTFILE_PATH", args.hostfile),
            (f"--recovery-dir/{RECOVERY_DIRECTORY_ENV}", args.recovery_dir),
        )
        if value is None
    ]
    if missing:
        parser.error("missing: " + ", ".join(missing))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare this pod; exit non-zero when it does not belong to the configured cluster."""
    args = _parse_args(argv)
    try:
        process = pod_process_id(args.pod_name, args.statefulset)
        if process >= args.replicas:
            raise ValueError(
                f"{args.pod_name} is process {process}, but STREAMSIGHT_REPLICAS is "
                f"{args.replicas}: set it to the StatefulSet's replica count"
            )
        held = prepare_directory(args.recovery_dir, process, args.partitions)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    addresses = peer_addresses(
        args.statefulset,
        args.replicas,
        args.port,
        service=args.service,
        namespace=args.namespace,
        cluster_domain=args.cluster_domain,
        hosts=args.hosts.split(",") if args.hosts else None,
    )
    write_hostfile(args.hostfile, addresses)
    print(
        f"process {process} of {args.replicas}: hostfile {args.hostfile}, "
        f"{held} recovery partitions in {args.recovery_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
