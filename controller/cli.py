"""datctl: render, check, submit and follow DAT training runs on Kubernetes.

Exit codes: 0 success; 1 the cluster refused or the job failed; 2 a mistake in the job spec or the
command line (one line per problem, no traceback).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from controller import chart, kube, schemas, spec, webhook
from trainer.yamlfile import describe_yaml_error, load_yaml_all

EXIT_FAILED, EXIT_USAGE = 1, 2


def _fail(lines: list[str] | str, code: int) -> int:
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"datctl: {line}", file=sys.stderr)
    return code


def _render(args: argparse.Namespace, namespace: str | None = None) -> spec.Rendered:
    job = spec.load_spec(args.jobspec, args.set, values_files=args.values, set_json=args.set_json,
                         set_string=args.set_string)
    rendered = spec.render(job, namespace=namespace or args.namespace, api=args.api)
    for line in rendered.warnings:
        print(f"datctl: warning: {line}", file=sys.stderr)
    return rendered


def cmd_render(args: argparse.Namespace) -> int:
    rendered = _render(args)
    if args.helm_values:  # the checked spec as a values file: helm install / Argo CD render the same objects
        text = ("# datctl render --helm-values: values for `helm install NAME charts/dat-training -f FILE`\n"
                + spec.to_yaml([rendered.helm_values]))
    else:
        text = spec.to_yaml(rendered.objects)
    if args.output:
        out_dir = Path(args.output)
        path = out_dir / f"{rendered.values['name']}{'-values' if args.helm_values else ''}.yaml"
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as exc:
            return _fail(f"-o {args.output}: cannot write {path} ({exc.strerror or exc}; -o takes a folder)",
                         EXIT_USAGE)
        what = "helm values" if args.helm_values else ", ".join(o["kind"] for o in rendered.objects)
        print(f"wrote {path} ({what})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Operator rules (and, with --schemas, the CRD schemas) for PyTorchJobs in manifest files."""
    problems: list[str] = []
    jobs = {"PyTorchJob": 0, "TrainJob": 0}
    for name in args.files:
        try:
            docs = [d for d in load_yaml_all(Path(name).read_text()) if d]
        except OSError as exc:
            problems.append(f"{name}: cannot read: {exc.strerror or exc.__class__.__name__}")
            continue
        except UnicodeDecodeError:
            problems.append(f"{name}: cannot read: not a text file")
            continue
        except yaml.YAMLError as exc:
            problems.append(f"{name}: cannot read: {describe_yaml_error(exc)}")
            continue
        for doc in docs:
            if not isinstance(doc, dict) or not isinstance(doc.get("metadata") or {}, dict):
                problems.append(f"{name}: not a Kubernetes object: {str(doc)[:60]!r}")
                continue
            if not doc.get("apiVersion") or not doc.get("kind"):
                problems.append(f"{name}: not a Kubernetes object (no apiVersion/kind); a job spec goes to "
                                "`datctl render` (or `datctl submit`)")
                continue
            label = f"{name}: {doc.get('kind')} {(doc.get('metadata') or {}).get('name')}"
            if doc.get("kind") in jobs:
                jobs[doc["kind"]] += 1
            if doc.get("kind") == "PyTorchJob":
                problems += [f"{label}: {p}" for p in webhook.check_pytorchjob(doc)]
            if args.schemas and schemas.has_crd(doc):
                try:
                    problems += [f"{label}: {p}" for p in schemas.crd_problems(doc)]
                except schemas.SchemaMissing as exc:
                    return _fail(str(exc), EXIT_USAGE)
    if problems:
        return _fail(problems, EXIT_USAGE)
    if not any(jobs.values()):
        return _fail(f"no PyTorchJob or TrainJob in {', '.join(args.files)}; validate checks rendered manifests "
                     "(a job spec goes to `datctl render`)", EXIT_USAGE)
    found = f"{jobs['PyTorchJob']} PyTorchJob(s)" + (f", {jobs['TrainJob']} TrainJob(s)" if jobs["TrainJob"] else "")
    print(f"ok: {found} in {len(args.files)} file(s)")
    return 0


def _cluster(args: argparse.Namespace) -> kube.Cluster:
    return kube.Cluster(kubeconfig=args.kubeconfig, context=args.context, namespace=args.namespace,
                        request_timeout=args.request_timeout)


def cmd_submit(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    rendered = _render(args, namespace=cluster.namespace)
    cluster.namespace = rendered.namespace
    kind = kube.KINDS[rendered.values["api"]]
    objects = rendered.objects
    if any(o["kind"] == "PodMonitor" for o in objects) and not cluster.serves(kube.PODMONITOR):
        if rendered.values["metrics"]["podMonitor"] != "auto":
            raise kube.ClusterError(f"metrics.podMonitor is true but the PodMonitor CRD "
                                    f"({kube.PODMONITOR.api_version}) is not installed; {kube.PODMONITOR.install}")
        # what helm's .Capabilities check does at install time
        objects = [o for o in objects if o["kind"] != "PodMonitor"]
        print("note: the cluster has no PodMonitor CRD; metrics are served but not scraped", file=sys.stderr)
    cluster.submit(objects, kind)
    name = rendered.values["name"]
    ns_flag = f" -n {cluster.namespace}"
    print(f"follow it: datctl watch {name}{ns_flag}   |   datctl logs {name}{ns_flag}")
    return 0


def _job(cluster: kube.Cluster, args: argparse.Namespace) -> tuple[kube.Kind, dict[str, Any] | None]:
    """The job's kind (--api, else whichever of PyTorchJob / TrainJob the cluster has by that name) and the job
    when it was read to find out."""
    if args.api:
        return kube.KINDS[args.api], None
    return cluster.find_job(args.name)


def cmd_status(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    kind, job = _job(cluster, args)
    print("\n".join(kube.status_report(cluster, kind, args.name, job=job)))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    started = time.monotonic()
    cluster = _cluster(args)
    kind, job = _job(cluster, args)
    ok = kube.watch(cluster, kind, args.name, interval=args.interval, timeout=args.timeout, job=job, started=started)
    print(f"{kind.kind} {cluster.namespace}/{args.name}: {'succeeded' if ok else 'failed'}")
    return 0 if ok else EXIT_FAILED


def cmd_logs(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    kind, job = _job(cluster, args)
    replica = args.replica
    if replica is None:
        if kind is kube.PYTORCHJOB and job is None:
            job = cluster.get_job(kind, args.name)
        replica = kube.default_replica(kind, job)
    cluster.logs(kind, args.name, replica, follow=args.follow, out=sys.stdout)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if args.api:
        kind = kube.KINDS[args.api]
        cluster.delete(kind, args.name)
    else:
        kind, _ = cluster.find_job(args.name, cluster.delete)
    what = "ConfigMap, ServiceAccount" if kind is kube.TRAINJOB else "ConfigMap"
    if args.wait and not cluster.wait_deleted(kind, args.name, args.timeout):
        raise kube.ClusterError(f"{kind.kind} {cluster.namespace}/{args.name} or its ConfigMap is still there after "
                                f"{args.timeout:g} s (a finalizer? kubectl get {kind.plural},configmaps -n "
                                f"{cluster.namespace}); a submit of the same name waits for them to go")
    print(f"{kind.kind.lower()}/{args.name} deleted (its pods, and the {what}, NetworkPolicy and PodMonitor "
          "datctl created with it, are garbage-collected)")
    return 0


EXPORTER_DESCRIPTION = "serve Prometheus metrics about the training jobs"
EXPORTER_HELP = f"{EXPORTER_DESCRIPTION} (datctl exporter --help)"  # in datctl --help: where its options are


def cmd_exporter(argv: list[str]) -> int:
    # Imported here: the other commands never load it, and a broken install of it is one line, not a traceback.
    try:
        exporter = importlib.import_module("controller.exporter")
    except ImportError as exc:
        return _fail(f"the exporter is not available in this installation ({exc})", EXIT_USAGE)
    parser = argparse.ArgumentParser(prog="datctl exporter", description=EXPORTER_DESCRIPTION, allow_abbrev=False)
    exporter.add_arguments(parser)
    return exporter.run(parser.parse_args(argv))


def _seconds(least: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
        if not (least <= value < float("inf")):
            raise argparse.ArgumentTypeError(f"must be at least {least:g} seconds, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datctl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def jobspec_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("jobspec", help="job spec YAML (a values file of charts/dat-training)")
        p.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                       help="a values file merged over the job spec (repeatable, later wins), like helm -f")
        p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a job spec value ('\\.' for a dot in a key), typed as helm --set types it")
        p.add_argument("--set-string", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="as --set, the value always a string (like helm --set-string)")
        p.add_argument("--set-json", action="append", default=[], metavar="KEY.PATH=JSON",
                       help="as --set, the value read as JSON (like helm --set-json); helm's order: -f, --set-json, "
                            "--set, --set-string")
        p.add_argument("--api", choices=sorted(kube.KINDS), help="override the spec's api")

    def cluster_args(p: argparse.ArgumentParser, api: bool = True) -> None:
        if api:  # the commands that take a job name
            p.add_argument("-n", "--namespace", help="the job's namespace (default: the kubeconfig context's "
                                                     "namespace; in a pod, the pod's; else default)")
        else:  # submit: the spec's namespace wins
            p.add_argument("-n", "--namespace", help="namespace when the spec has none (default: the kubeconfig "
                                                     "context's namespace; in a pod, the pod's; else default)")
        p.add_argument("--kubeconfig", help="default: $KUBECONFIG, ~/.kube/config, else in-cluster")
        p.add_argument("--context", help="kubeconfig context")
        p.add_argument("--request-timeout", type=_seconds(least=0.1), default=30.0, metavar="SECONDS",
                       help="give up on an API call the server does not answer within SECONDS (default 30)")
        if api:
            p.add_argument("--api", choices=sorted(kube.KINDS),
                           help="the job's kind (default: the PyTorchJob of that name, else the TrainJob)")

    p = sub.add_parser("render", help="print (or write) the job, its ConfigMap and PodMonitor (a TrainJob's ServiceAccount) of a job spec")
    jobspec_args(p)
    p.add_argument("-o", "--output", metavar="DIR", help="write DIR/<name>.yaml instead of printing")
    p.add_argument("-n", "--namespace", help="namespace when the spec has none (default: default)")
    p.add_argument("--helm-values", action="store_true",
                   help="print (or write DIR/<name>-values.yaml) the checked spec as a values file for helm or a GitOps "
                        "tool instead: trainerConfigFile inlined as trainer:, --set/-f applied")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="check rendered PyTorchJob manifests against the training operator's "
                                        "rules (TrainJobs: --schemas)")
    p.add_argument("files", nargs="+")
    p.add_argument("--schemas", action="store_true",
                   help="also validate against the CRD schemas in $DAT_SCHEMA_DIR (default ../shared/schemas)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("submit", help="create the job and its objects in the cluster")
    jobspec_args(p)
    cluster_args(p, api=False)
    p.set_defaults(func=cmd_submit)

    for name, func, help_text in (("status", cmd_status, "conditions, replicas, pods and the latest epoch figures"),
                                  ("watch", cmd_watch, "follow conditions until Succeeded / Failed"),
                                  ("logs", cmd_logs, "print a replica's trainer log"),
                                  ("delete", cmd_delete, "delete the job (and what datctl created with it)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("name")
        cluster_args(p)
        p.set_defaults(func=func)
        if name == "watch":
            p.add_argument("--interval", type=_seconds(least=1.0), default=10.0,
                           help="seconds between polls (at least 1: each poll is a GET on the API server)")
            p.add_argument("--timeout", type=_seconds(least=0.0), default=0.0,
                           help="give up after this many seconds (0: never)")
        if name == "delete":
            p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                           help="wait until the job and its ConfigMap are gone, as kubectl delete does (default), "
                                "so that a submit of the same name can follow")
            p.add_argument("--timeout", type=_seconds(least=0.0), default=60.0,
                           help="seconds to wait for that (default 60)")
        if name == "logs":
            p.add_argument("--replica", help="master-0, worker-<i> (TrainJob: node-<i>); default: the first pod")
            p.add_argument("-f", "--follow", action="store_true")

    sub.add_parser("exporter", help=EXPORTER_HELP)  # listed here; main() hands its arguments to the exporter
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["exporter"]:
        return cmd_exporter(argv[1:])
    args = build_parser().parse_args(argv)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings; the one-line error says it all
    try:
        return args.func(args)
    except spec.SpecError as exc:
        return _fail(exc.problems, EXIT_USAGE)
    except chart.ChartError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except kube.KubeconfigError as exc:  # --kubeconfig / --context / the kubeconfig file: the user's mistake
        return _fail(str(exc), EXIT_USAGE)
    except kube.ClusterError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
