"""The pod contract of the committed smoke manifest, run for real: the container's command and env plus the
PET_* variables the training operator injects, two "nodes" as two torchrun launchers on this machine, the
trainer config from the ConfigMap. A second launch (a restarted job) resumes from the checkpoint volume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_pods_train_and_resume(tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "manifests" / "dat-smoke.yaml").read_text()) if d}
    job = docs["PyTorchJob"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    nodes = sum(r["replicas"] for r in replicas.values())
    container = replicas["Master"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}

    # The ConfigMap's config, with the pod's mount points moved under tmp_path.
    config = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    output_dir = Path(config["run"]["output_dir"])
    assert output_dir.parent == Path(mounts["checkpoints"])
    local_output = tmp_path / output_dir.relative_to("/")
    config["run"]["output_dir"] = str(local_output)
    config["metrics"]["port"] = 0  # both "nodes" share this machine; the port is tested in test_observability
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [config_path.as_posix() if arg == f"{mounts['config']}/config.yaml" else arg
               for arg in container["command"]]
    assert command[0] == "dat-torchrun"

    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    scratch = tmp_path / "scratch"  # the pod's /tmp emptyDir
    env = {k: v.replace("/tmp", str(scratch)) for k, v in env.items()}
    master_port = free_port()
    base_env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DAT_NAMESPACE": "team-a",
                # what the operator injects (training operator v1.9)
                "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
                "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(master_port)}

    def launch() -> list[subprocess.CompletedProcess]:
        procs = [subprocess.Popen(command, cwd=tmp_path, env={**base_env, "PET_NODE_RANK": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(nodes)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out[-4000:]
        return outputs

    master_log, worker_log = launch()
    assert f"world={nodes}" in master_log  # one job over both launchers, not two single-node runs
    assert "DAT: model=" not in worker_log  # the worker is rank 1
    records = [json.loads(line) for line in (local_output / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, config["run"]["epochs"] + 1))
    assert (local_output / "checkpoint-latest.pt").is_file()

    base_env["PET_MASTER_PORT"] = str(free_port())
    master_log, _ = launch()
    assert f"nothing to do: the checkpoint is from epoch {config['run']['epochs']} " in master_log
