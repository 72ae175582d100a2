"""Tests of launch/: the exact commands each script prints with DRY_RUN=1, and its checks.

No network and no cloud tools: every script runs under `bash` with DRY_RUN=1 in a clean
environment, and each printed "+ " line is parsed back into an argv with shlex.
"""
import os
import pathlib
import shlex
import signal
import stat
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh"))
EXECUTABLES = [s for s in SCRIPTS if s != "common.sh"]

TPU = {"TPU_NAME": "dit-xl", "PROJECT": "my-proj", "ZONE": "us-central2-b"}
GCLOUD = ["--zone=us-central2-b", "--project=my-proj"]
DEFAULT_CONFIG = "--config=configs/imagenet256.py:variant=XL/2"


def launch(script, dry_run=True, **env):
  """Runs launch/<script> under bash in a clean environment; returns CompletedProcess."""
  full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
              "TMPDIR": "/tmp", **env}
  if dry_run:
    full_env["DRY_RUN"] = "1"
  return subprocess.run(["bash", str(LAUNCH / script)], env=full_env, capture_output=True,
                        text=True, timeout=10, check=False)


def commands(proc):
  """The argv of every printed command; fails unless the script succeeded."""
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines, proc.stderr
  for line in lines:
    assert line.startswith("+ "), f"not a command line: {line!r}"
  return [shlex.split(line[2:]) for line in lines]


JAX_PIN = "0.10.2"  # setup.py's jax pin; test_install_pins_jax_from_setup_py checks it.
LIBTPU = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
VENV_PY = "$HOME/dit_jax_venv/bin/python"


def install_commands(tpu_name="dit-xl"):
  tarball = f"/tmp/dit_jax-{tpu_name}.tar.gz"
  remote = ("set -e; rm -rf dit_jax && mkdir -p dit_jax"
            " && tar -xzf dit_jax.tar.gz -C dit_jax && cd dit_jax"
            " && python3 -m pip install --user -q -U uv"
            " && python3 -m uv venv --allow-existing --seed --python 3.11 $HOME/dit_jax_venv"
            f" && {VENV_PY} -m pip install 'jax[tpu]=={JAX_PIN}' -f {LIBTPU}"
            " -e '.[imagenet,gcs]'")
  check = ("import sys, jax; print(sys.version.split()[0], jax.__version__, jax.devices())")
  return [
      ["git", "-C", str(ROOT), "archive", "--format=tar.gz", "-o", tarball, "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{tpu_name}:dit_jax.tar.gz",
       "--worker=all", "--recurse", *GCLOUD],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, "--worker=all", *GCLOUD,
       f"--command={remote}"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, "--worker=all", *GCLOUD,
       f"--command={VENV_PY} -c {shlex.quote(check)}"],
  ]


def train_remote(python_args):
  pid, log, status = "$HOME/dit_jax_train.pid", "$HOME/dit_jax_train.log", "$HOME/dit_jax_train.exit"
  inner = f"{VENV_PY} {python_args} & echo $! > {pid}; wait $!; echo $? > {status}"
  return (f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null;'
          f' then echo "training already running (pid $(cat {pid}))" >&2; exit 1; fi;'
          f" cd dit_jax || exit 1; rm -f {status};"
          f" nohup bash -c {shlex.quote(inner)} >> {log} 2>&1 < /dev/null & sleep 1")


def prepare_command(extra=""):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dit-xl", "--worker=0", *GCLOUD,
          f"--command=cd dit_jax && {VENV_PY} -m dit_jax.prepare {DEFAULT_CONFIG}{extra}"]


def train_command(workdir, extra="", multi_host=True):
  distributed = " --distributed=auto" if multi_host else ""
  python_args = f"-m dit_jax.main {DEFAULT_CONFIG} --workdir={workdir}{distributed}{extra}"
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dit-xl", "--worker=all", *GCLOUD,
          f"--command={train_remote(python_args)}"]


def train_commands(workdir, extra="", multi_host=True):
  """The one-time data step on worker 0, then training on every worker."""
  return [prepare_command(extra), train_command(workdir, extra, multi_host)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
  proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True,
                        text=True, timeout=10, check=False)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", EXECUTABLES)
def test_executable_with_usage(script):
  path = LAUNCH / script
  assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
  assert path.read_text().startswith("#!/usr/bin/env bash\n")
  assert "set -euo pipefail" in path.read_text()
  proc = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True,
                        timeout=10, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "Usage" in proc.stdout or "Submit it" in proc.stdout
  assert "DRY_RUN=1" in proc.stdout
  proc = subprocess.run(["bash", str(path), "extra-arg"], capture_output=True, text=True,
                        timeout=10, check=False)
  assert proc.returncode != 0
  assert "environment variables" in proc.stderr


@pytest.mark.parametrize("script,env,missing", [
    ("tpu_create.sh", {**TPU, "ACCELERATOR_TYPE": "v4-8"}, "TPU_NAME"),
    ("tpu_create.sh", {**TPU, "ACCELERATOR_TYPE": "v4-8"}, "ZONE"),
    ("tpu_create.sh", {**TPU, "ACCELERATOR_TYPE": "v4-8"}, "PROJECT"),
    ("tpu_create.sh", {**TPU, "ACCELERATOR_TYPE": "v4-8"}, "ACCELERATOR_TYPE"),
    ("tpu_install.sh", TPU, "TPU_NAME"),
    ("tpu_install.sh", TPU, "ZONE"),
    ("tpu_train.sh", {**TPU, "ACCELERATOR_TYPE": "v4-8", "WORKDIR": "gs://b/r"}, "WORKDIR"),
    ("tpu_train.sh", {**TPU, "ACCELERATOR_TYPE": "v4-8", "WORKDIR": "gs://b/r"},
     "ACCELERATOR_TYPE"),
    ("tpu_logs.sh", TPU, "TPU_NAME"),
    ("tpu_watch.sh", {**TPU, "ACCELERATOR_TYPE": "v4-8", "WORKDIR": "gs://b/r"}, "WORKDIR"),
    ("tpu_watch.sh", {**TPU, "ACCELERATOR_TYPE": "v4-8", "WORKDIR": "gs://b/r"}, "PROJECT"),
    ("gpu_submit.sh", {"WORKDIR": "/shared/r"}, "WORKDIR"),
    ("gpu_slurm.sh", {"WORKDIR": "/shared/r"}, "WORKDIR"),
])
def test_missing_required_variable_fails_naming_it(script, env, missing):
  env = {k: v for k, v in env.items() if k != missing}
  proc = launch(script, **env)
  assert proc.returncode != 0
  assert f"required environment variable {missing} is not set" in proc.stderr
  assert "+ " not in proc.stdout  # nothing was (or would have been) run


@pytest.mark.parametrize("accel,version", [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v2-alpha-tpuv5"),
    ("v6e-16", "v2-alpha-tpuv6e"),
])
def test_create(accel, version):
  cmds = commands(launch("tpu_create.sh", **TPU, ACCELERATOR_TYPE=accel))
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "dit-xl", *GCLOUD,
                   f"--accelerator-type={accel}", f"--version={version}"]]


def test_create_spot_pod_with_runtime_version_and_extra_flags():
  cmds = commands(launch("tpu_create.sh", **TPU, ACCELERATOR_TYPE="v4-32", SPOT="1",
                         RUNTIME_VERSION="tpu-vm-base", CREATE_FLAGS="--network=n1 --tags=a"))
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "dit-xl", *GCLOUD,
                   "--accelerator-type=v4-32", "--version=tpu-vm-base", "--spot",
                   "--network=n1", "--tags=a"]]
  cmds = commands(launch("tpu_create.sh", **TPU, ACCELERATOR_TYPE="v4-8", PREEMPTIBLE="1"))
  assert cmds[0][-1] == "--preemptible"


def test_create_queued_resource():
  cmds = commands(launch("tpu_create.sh", **TPU, ACCELERATOR_TYPE="v5p-64", QUEUED="1",
                         SPOT="1", QUEUED_RESOURCE="qr-1"))
  assert cmds == [
      ["gcloud", "compute", "tpus", "queued-resources", "create", "qr-1", "--node-id=dit-xl",
       *GCLOUD, "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--spot"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "qr-1", *GCLOUD,
       "--format=value(state.state)"],
  ]


@pytest.mark.parametrize("env,message", [
    ({"ACCELERATOR_TYPE": "v4-8", "SPOT": "1", "PREEMPTIBLE": "1"}, "exclusive"),
    ({"ACCELERATOR_TYPE": "v4-8", "QUEUED": "1", "PREEMPTIBLE": "1"}, "queued"),
    ({"ACCELERATOR_TYPE": "v4-8", "SPOT": "yes"}, "SPOT must be 0 or 1, got 'yes'"),
    ({"ACCELERATOR_TYPE": "tpu-big"}, "ACCELERATOR_TYPE='tpu-big'"),
    ({"ACCELERATOR_TYPE": "v9x-8"}, "no default RUNTIME_VERSION"),
])
def test_create_refuses_bad_settings(env, message):
  proc = launch("tpu_create.sh", **TPU, **env)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert proc.stdout == ""


def test_install_copies_to_all_workers_and_pip_installs():
  assert commands(launch("tpu_install.sh", **TPU)) == install_commands()


def test_install_options():
  cmds = commands(launch("tpu_install.sh", **TPU, GIT_REF="v1.0", REMOTE_DIR="src/dit",
                         JAX_SPEC="jax[tpu]==0.10.2", PIP_EXTRAS="imagenet,torch",
                         TARBALL="/tmp/x.tgz"))
  assert cmds[0][-3:] == ["-o", "/tmp/x.tgz", "v1.0"]
  assert cmds[1][5:7] == ["/tmp/x.tgz", "dit-xl:src/dit.tar.gz"]
  remote = cmds[2][-1]
  assert "tar -xzf src/dit.tar.gz -C src/dit && cd src/dit" in remote
  assert f"pip install 'jax[tpu]==0.10.2' -f {LIBTPU} -e '.[imagenet,torch]'" in remote


def test_install_makes_a_python_3_11_env_with_pinned_jax_tpu_and_the_gcs_extra():
  """The TPU images ship Python 3.10; the pins need >= 3.11 (setup.py says so too)."""
  remote = commands(launch("tpu_install.sh", **TPU))[2][-1]
  assert "python3 -m uv venv --allow-existing --seed --python 3.11 $HOME/dit_jax_venv" in remote
  # jax[tpu] pinned and resolved together with the package (nothing downgrades jax later).
  assert f"{VENV_PY} -m pip install 'jax[tpu]=={JAX_PIN}' -f {LIBTPU} -e '.[imagenet,gcs]'" in remote
  setup = (ROOT / "setup.py").read_text()
  assert f'"jax=={JAX_PIN}"' in setup and 'python_requires=">=3.11"' in setup
  assert '"gcs": ["gcsfs' in setup and "google-cloud-storage" in setup
  proc = launch("tpu_install.sh", **TPU, PYTHON_VERSION="3.10")
  assert proc.returncode != 0 and "must be 3.11 or later" in proc.stderr


def test_gpu_install_pins_jax_cuda12_in_a_python_3_11_env():
  cmds = commands(launch("gpu_install.sh", VENV="/shared/venvs/dit"))
  assert ["uv", "venv", "--allow-existing", "--seed", "--python", "3.11",
          "/shared/venvs/dit"] in [c[-7:] for c in cmds]
  assert ["/shared/venvs/dit/bin/python", "-m", "pip", "install", f"jax[cuda12]=={JAX_PIN}",
          "-e", f"{ROOT}[imagenet,gcs]"] in cmds


def test_train_pod_slice():
  cmds = commands(launch("tpu_train.sh", **TPU, ACCELERATOR_TYPE="v4-32",
                         WORKDIR="gs://bucket/runs/xl2"))
  assert cmds == train_commands("gs://bucket/runs/xl2")
  assert "v4-32 has 4 hosts: --distributed=auto" in launch(
      "tpu_train.sh", **TPU, ACCELERATOR_TYPE="v4-32", WORKDIR="gs://b/r").stderr


@pytest.mark.parametrize("accel,hosts", [
    ("v4-8", 1), ("v4-16", 2), ("v4-32", 4), ("v5p-8", 1), ("v5p-16", 2), ("v5litepod-8", 1),
    ("v5litepod-16", 4), ("v6e-8", 1), ("v6e-16", 4), ("v6e-256", 64), ("v3-8", 1)])
def test_train_passes_distributed_auto_exactly_on_multi_host_types(accel, hosts):
  proc = launch("tpu_train.sh", **TPU, ACCELERATOR_TYPE=accel, WORKDIR="gs://b/r")
  cmds = commands(proc)
  assert cmds == train_commands("gs://b/r", multi_host=hosts > 1)
  assert (f"{accel} has {hosts} hosts" in proc.stderr) == (hosts > 1)


def test_train_data_step_options():
  cmds = commands(launch("tpu_train.sh", **TPU, ACCELERATOR_TYPE="v4-8", WORKDIR="gs://b/r",
                         PREPARE="0"))
  assert cmds == [train_command("gs://b/r", multi_host=False)]
  cmds = commands(launch("tpu_train.sh", **TPU, ACCELERATOR_TYPE="v4-8", WORKDIR="gs://b/r",
                         EXTRACT="1", EXTRACT_FLAGS="--data imagenet2012 --out /mnt/lat"))
  assert cmds[0] == prepare_command() and cmds[2] == train_command("gs://b/r", multi_host=False)
  assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dit-xl", "--worker=all",
                     *GCLOUD, f"--command=cd dit_jax && if [ -f dit_jax/extract.py ]; then"
                     f" {VENV_PY} -m dit_jax.extract --data imagenet2012 --out /mnt/lat; else"
                     " echo 'dit_jax.extract is not installed: no latent cache' >&2; fi"]
  proc = launch("tpu_train.sh", **TPU, ACCELERATOR_TYPE="v4-8", WORKDIR="gs://b/r", EXTRACT="1")
  assert proc.returncode != 0 and "EXTRACT=1 needs EXTRACT_FLAGS" in proc.stderr


def test_train_config_extra_flags_and_env():
  cmds = commands(launch("tpu_train.sh", **TPU, ACCELERATOR_TYPE="v5p-64",
                         WORKDIR="gs://b/r", CONFIG="configs/imagenet256.py:variant=B/4",
                         EXTRA_FLAGS="--config.total_steps=10 --config.seed=3",
                         REMOTE_ENV="TF_CPP_MIN_LOG_LEVEL=1"))
  assert cmds[0][-1] == ("--command=cd dit_jax && env TF_CPP_MIN_LOG_LEVEL=1 "
                         f"{VENV_PY} -m dit_jax.prepare --config=configs/imagenet256.py:"
                         "variant=B/4 --config.total_steps=10 --config.seed=3")
  remote = cmds[1][-1]
  assert ("nohup bash -c 'env TF_CPP_MIN_LOG_LEVEL=1 $HOME/dit_jax_venv/bin/python -m"
          " dit_jax.main --config=configs/imagenet256.py:variant=B/4 --workdir=gs://b/r"
          " --distributed=auto --config.total_steps=10 --config.seed=3 &") in remote
  assert cmds[1][:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dit-xl",
                         "--worker=all"]


@pytest.mark.parametrize("accel", ["v4-16", "v4-32", "v5p-64", "v5litepod-16", "v6e-256"])
@pytest.mark.parametrize("workdir", ["/home/me/runs/x", "runs/x", "s3://b/x"])
def test_train_refuses_local_workdir_on_multi_host(accel, workdir):
  proc = launch("tpu_train.sh", **TPU, ACCELERATOR_TYPE=accel, WORKDIR=workdir)
  assert proc.returncode != 0
  assert f"WORKDIR='{workdir}' must be a gs:// path on a multi-host TPU" in proc.stderr
  assert proc.stdout == ""


@pytest.mark.parametrize("accel", ["v4-8", "v5litepod-8", "v5p-8", "v6e-4"])
def test_train_single_host_accepts_local_workdir(accel):
  cmds = commands(launch("tpu_train.sh", **TPU, ACCELERATOR_TYPE=accel,
                         WORKDIR="/home/me/runs/x"))
  assert cmds == train_commands("/home/me/runs/x", multi_host=False)


def test_train_remote_command_detaches_and_refuses_a_second_run(tmp_path):
  """Runs the printed remote command locally with a stand-in python3."""
  (tmp_path / "dit_jax").mkdir()
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (tmp_path / "dit_jax_venv" / "bin").mkdir(parents=True)
  fake = tmp_path / "dit_jax_venv" / "bin" / "python"
  fake.write_text("#!/bin/sh\necho \"args: $*\"\nexec sleep 30\n")
  fake.chmod(0o755)
  remote = commands(launch("tpu_train.sh", **TPU, ACCELERATOR_TYPE="v4-8",
                           WORKDIR="gs://b/r", EXTRA_FLAGS="--config.seed=1"))[1][-1]
  assert remote.startswith("--command=")
  remote = remote[len("--command="):]
  env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  first = subprocess.run(["bash", "-c", remote], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=10, check=False)
  assert first.returncode == 0, first.stderr
  pid = int((tmp_path / "dit_jax_train.pid").read_text())
  try:
    second = subprocess.run(["bash", "-c", remote], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=10, check=False)
    assert second.returncode == 1
    assert f"training already running (pid {pid})" in second.stderr
    log = tmp_path / "dit_jax_train.log"
    for _ in range(100):
      if log.exists() and log.read_text():
        break
      time.sleep(0.05)
    assert log.read_text() == (f"args: -m dit_jax.main {DEFAULT_CONFIG} --workdir=gs://b/r"
                               " --config.seed=1\n")
    assert not (tmp_path / "dit_jax_train.exit").exists()
  finally:
    os.kill(pid, signal.SIGTERM)
  # The process's exit status lands in the exit file (tpu_watch.sh reads it).
  status = tmp_path / "dit_jax_train.exit"
  for _ in range(100):
    if status.exists() and status.read_text():
      break
    time.sleep(0.05)
  assert status.read_text() == f"{128 + signal.SIGTERM}\n"


@pytest.mark.parametrize("env,worker,tail", [
    ({}, "0", "tail -n 100 -F $HOME/dit_jax_train.log"),
    ({"WORKER": "all"}, "all", "tail -n 100 -F $HOME/dit_jax_train.log"),
    ({"WORKER": "3", "TAIL_LINES": "10", "FOLLOW": "0"}, "3",
     "tail -n 10 $HOME/dit_jax_train.log"),
])
def test_logs(env, worker, tail):
  cmds = commands(launch("tpu_logs.sh", **TPU, **env))
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dit-xl",
                   f"--worker={worker}", *GCLOUD, f"--command={tail}"]]


def test_logs_refuses_bad_worker():
  proc = launch("tpu_logs.sh", **TPU, WORKER="first")
  assert proc.returncode != 0 and "WORKER must be" in proc.stderr


WATCH = {**TPU, "ACCELERATOR_TYPE": "v4-32", "WORKDIR": "gs://bucket/runs/xl2"}
DESCRIBE = ["gcloud", "compute", "tpus", "tpu-vm", "describe", "dit-xl", *GCLOUD,
            "--format=value(state)"]
_PID, _EXIT = "$HOME/dit_jax_train.pid", "$HOME/dit_jax_train.exit"
PROBE = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dit-xl", "--worker=all", *GCLOUD,
         f'--command=if [ -f {_PID} ] && kill -0 "$(cat {_PID})" 2>/dev/null; then echo'
         f" dit_jax_training alive; elif [ -f {_EXIT} ]; then echo dit_jax_training exit"
         f" $(cat {_EXIT}); else echo dit_jax_training none; fi"]
KILL_REST = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dit-xl", "--worker=all", *GCLOUD,
             f"--command=if [ -f {_PID} ]; then p=$(cat {_PID}); kill -9 $p 2>/dev/null;"
             " for i in $(seq 60); do kill -0 $p 2>/dev/null || break; sleep 1; done; fi; true"]


@pytest.mark.parametrize("state", ["PREEMPTED", "TERMINATED"])
def test_watch_restarts_after_preemption(state):
  cmds = commands(launch("tpu_watch.sh", **WATCH, SPOT="1", FAKE_STATE=state))
  assert cmds == [
      DESCRIBE,
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "dit-xl", *GCLOUD, "--quiet"],
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "dit-xl", *GCLOUD,
       "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"],
      *install_commands(),
      *train_commands("gs://bucket/runs/xl2"),
  ]


@pytest.mark.parametrize("state", [None, "READY", "CREATING"])
def test_watch_healthy_tpu_only_polls_once_in_dry_run(state):
  env = {} if state is None else {"FAKE_STATE": state}
  proc = launch("tpu_watch.sh", **WATCH, **env)
  expected = [DESCRIBE, PROBE] if state in (None, "READY") else [DESCRIBE]
  assert commands(proc) == expected
  assert f"dit-xl is {state or 'READY'}" in proc.stderr


def test_watch_queued_resource():
  cmds = commands(launch("tpu_watch.sh", **WATCH, QUEUED="1", SPOT="1",
                         FAKE_STATE="SUSPENDED"))
  qr = ["gcloud", "compute", "tpus", "queued-resources"]
  assert cmds[:4] == [
      [*qr, "describe", "dit-xl", *GCLOUD, "--format=value(state.state)"],
      [*qr, "delete", "dit-xl", *GCLOUD, "--force", "--quiet"],
      [*qr, "create", "dit-xl", "--node-id=dit-xl", *GCLOUD, "--accelerator-type=v4-32",
       "--runtime-version=tpu-ubuntu2204-base", "--spot"],
      [*qr, "describe", "dit-xl", *GCLOUD, "--format=value(state.state)"],
  ]
  assert cmds[4:] == [*install_commands(), *train_commands("gs://bucket/runs/xl2")]


def test_watch_limits():
  proc = launch("tpu_watch.sh", **WATCH, FAKE_STATE="PREEMPTED", MAX_RESTARTS="0")
  assert proc.returncode != 0 and "MAX_RESTARTS=0 restarts are used up" in proc.stderr
  proc = launch("tpu_watch.sh", dry_run=False, **WATCH, FAKE_STATE="PREEMPTED")
  assert proc.returncode != 0 and "FAKE_STATE='PREEMPTED'" in proc.stderr
  assert "only for DRY_RUN=1" in proc.stderr
  assert proc.stdout == ""
  proc = launch("tpu_watch.sh", **{**WATCH, "WORKDIR": "/tmp/x"}, FAKE_STATE="PREEMPTED")
  assert proc.returncode != 0 and "must be a gs:// path" in proc.stderr
  assert proc.stdout == ""


def srun_command(workdir, extra=(), nodes=2):
  distributed = ["--distributed=auto"] if nodes > 1 else []
  return ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-m",
          "dit_jax.main", DEFAULT_CONFIG, f"--workdir={workdir}", *distributed, *extra]


def srun_prepare(extra=(), config=DEFAULT_CONFIG):
  return ["srun", "--nodes=1", "--ntasks=1", "python", "-m", "dit_jax.prepare", config, *extra]


def test_gpu_submit_prints_sbatch_and_srun():
  cmds = commands(launch("gpu_submit.sh", NODES="4", GPUS_PER_NODE="8", PARTITION="a100",
                         WORKDIR="gs://bucket/runs/xl2", EXTRA_FLAGS="--config.seed=1",
                         SBATCH_FLAGS="--account=abc", TIME_LIMIT="2-00:00:00"))
  assert cmds == [
      ["env", f"CONFIG={DEFAULT_CONFIG[len('--config='):]}", "WORKDIR=gs://bucket/runs/xl2",
       "EXTRA_FLAGS=--config.seed=1", "GPUS_PER_NODE=8", f"REPO_ROOT={ROOT}",
       "sbatch", "--job-name=dit_jax", "--nodes=4", "--ntasks-per-node=1",
       "--gpus-per-node=8", f"--chdir={ROOT}", "--partition=a100", "--time=2-00:00:00",
       "--account=abc", str(LAUNCH / "gpu_slurm.sh")],
      ["cd", str(ROOT)],
      ["export", "JAX_COORDINATOR_ADDRESS=HEAD_NODE:61440"],
      ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"],
      srun_prepare(["--config.seed=1"]),
      srun_command("gs://bucket/runs/xl2", ["--config.seed=1"], nodes=4),
  ]
  one_node = commands(launch("gpu_submit.sh", NODES="1", WORKDIR="/r"))
  assert one_node[-1] == srun_command("/r", nodes=1)


def test_gpu_submit_refuses_relative_workdir_on_several_nodes():
  proc = launch("gpu_submit.sh", NODES="2", WORKDIR="runs/x")
  assert proc.returncode != 0 and "WORKDIR='runs/x'" in proc.stderr
  proc = launch("gpu_submit.sh", NODES="0", WORKDIR="/r")
  assert proc.returncode != 0 and "NODES must be a positive integer" in proc.stderr


@pytest.mark.parametrize("nodelist,head", [
    ("gpu001", "gpu001"), ("gpu001,gpu007", "gpu001"), ("gpu[003-004,9],cpu1", "gpu003"),
    ("node[12,15]", "node12"),
])
def test_gpu_slurm_inside_a_job(nodelist, head):
  cmds = commands(launch("gpu_slurm.sh", SLURM_JOB_NODELIST=nodelist, SLURM_JOB_ID="5000",
                         SLURM_GPUS_ON_NODE="4", WORKDIR="/shared/r",
                         CONFIG="configs/imagenet256.py:variant=B/4", VENV="/opt/venv"))
  assert cmds == [
      ["source", "/opt/venv/bin/activate"],
      ["cd", str(ROOT)],
      ["export", f"JAX_COORDINATOR_ADDRESS={head}:{5000 % 4096 + 61440}"],
      ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"],
      srun_prepare(config="--config=configs/imagenet256.py:variant=B/4"),
      ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-m", "dit_jax.main",
       "--config=configs/imagenet256.py:variant=B/4", "--workdir=/shared/r",
       "--distributed=auto"],
  ]


def test_gpu_slurm_sbatch_header():
  text = (LAUNCH / "gpu_slurm.sh").read_text()
  for directive in ["--nodes=", "--ntasks-per-node=1", "--gpus-per-node="]:
    assert f"#SBATCH {directive}" in text
  # Slurm stops reading directives at the first command.
  header = text.split("set -euo pipefail")[0]
  assert header.count("#SBATCH") == text.count("#SBATCH")


def test_watch_restarts_a_crashed_run_on_a_ready_tpu():
  proc = launch("tpu_watch.sh", **WATCH, FAKE_TRAINING="crashed")
  assert commands(proc) == [DESCRIBE, PROBE, KILL_REST, ["sleep", "70"],
                            *train_commands("gs://bucket/runs/xl2")]
  assert "crash restart 1/3" in proc.stderr
  proc = launch("tpu_watch.sh", **WATCH, FAKE_TRAINING="finished")
  assert commands(proc) == [DESCRIBE, PROBE]
  assert "training ended with status 0 on every worker" in proc.stderr
  proc = launch("tpu_watch.sh", **WATCH, FAKE_TRAINING="crashed", MAX_CRASHES="0")
  assert proc.returncode != 0 and "MAX_CRASHES=0" in proc.stderr


@pytest.mark.parametrize("answers,code,message", [
    # Per poll: the workers' answers. A crash (one worker's nonzero status, the other alive
    # and hung in a collective) restarts; a second one in a row with MAX_CRASHES=1 gives up.
    (["exit 1|alive", "none|none"], 1, "crashed 2 times in a row (MAX_CRASHES=1)"),
    # Seen alive at two polls in a row: the crash count starts again.
    (["exit 137|alive", "alive|alive", "alive|alive", "exit 1|exit 1", "exit 0|exit 0"], 0,
     "training ended with status 0 on every worker"),
])
def test_watch_reads_the_workers_training_status(tmp_path, answers, code, message):
  """The real loop (no DRY_RUN) against a stand-in gcloud that answers a scripted status."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (tmp_path / "answers").write_text("\n".join(answers) + "\n")
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f"""#!/bin/bash
echo "$*" >> {tmp_path}/calls
case "$*" in
  *describe*) echo READY ;;
  *"dit_jax_training alive"*)
    line=$(head -n 1 {tmp_path}/answers); sed -i 1d {tmp_path}/answers
    IFS='|' read -ra workers <<< "$line"
    for w in "${{workers[@]}}"; do echo "dit_jax_training $w"; done ;;
esac
""")
  gcloud.chmod(0o755)
  proc = launch("tpu_watch.sh", dry_run=False, **WATCH, MAX_CRASHES="1", POLL_SECONDS="0",
                LEASE_WAIT_SECONDS="0",
                PATH=f"{bin_dir}:{os.environ['PATH']}", LAUNCH_DIR=str(LAUNCH))
  assert proc.returncode == code, proc.stderr
  assert message in proc.stderr
  calls = (tmp_path / "calls").read_text()
  restarts = calls.count("kill -9")
  assert restarts == (1 if code else 2)
  assert calls.count("dit_jax.main") == restarts  # tpu_train.sh after each kill.
