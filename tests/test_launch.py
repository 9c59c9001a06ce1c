"""The cluster launchers (launch/): their syntax, the commands they print with DRY_RUN=1 (nothing reaches a cloud or
a scheduler), their refusal of a missing required setting, and the config fields their header examples name."""
import os
import pathlib
import re
import shlex
import shutil
import subprocess

import pytest

from colorjax import main as cli
from conftest import REPO, run_cli

LAUNCH = REPO / "launch"
LAUNCHERS = sorted(p.name for p in LAUNCH.iterdir() if p.is_file() and p.suffix in (".sh", ".sbatch"))
# Arguments whose quoting must survive the trip: parentheses, quotes, spaces, a glob character.
TRICKY = ["--config", "configs/score.py:150m", "--config.score.conditionals=('gs://b/runs/cond a/params',)",
          "--config.workdir=gs://b/scores*"]


def launch(script, *args, check=True, **env):
  """Run launch/<script> with bash, a minimal environment plus `env`; returns the CompletedProcess."""
  full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LC_ALL": "C"}
  full_env.update({k: str(v) for k, v in env.items()})
  proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=full_env, capture_output=True,
                        text=True, timeout=60)
  if check and proc.returncode != 0:
    raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


def commands(stdout):
  """The printed commands, each split as a shell would (comment lines dropped)."""
  return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def option(argv, name):
  """The value of `name VALUE` or `name=VALUE` in argv."""
  for i, word in enumerate(argv):
    if word == name:
      return argv[i + 1]
    if word.startswith(name + "="):
      return word[len(name) + 1:]
  raise AssertionError(f"{name} not in {argv}")


def contains(seq, sub):
  return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("script", LAUNCHERS)
def test_syntax(script):
  proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", LAUNCHERS)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed")
  proc = subprocess.run(["shellcheck", "-x", str(LAUNCH / script)], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


TPU_ENV = dict(DRY_RUN=1, TPU="pod-1", ZONE="us-east5-a")


def test_tpu_run_quotes_the_arguments_for_every_worker():
  (argv,) = commands(launch("tpu_pod.sh", "run", *TRICKY, **TPU_ENV).stdout)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
  assert "--worker=all" in argv and option(argv, "--zone") == "us-east5-a"
  remote = shlex.split(option(argv, "--command"))
  assert remote == ["cd", "colorjax", "&&", ".venv/bin/python", "-m", "colorjax.main", *TRICKY]


def test_tpu_run_detached_writes_the_log():
  (argv,) = commands(launch("tpu_pod.sh", "run", *TRICKY, LOG="logs/score.log", RUN_ENV="WANDB_MODE=offline",
                            REPO_DIR="work/cj", **TPU_ENV).stdout)
  remote = shlex.split(option(argv, "--command"))
  assert remote[:3] == ["cd", "work/cj", "&&"]
  assert contains(remote, ["WANDB_MODE=offline", "nohup", ".venv/bin/python", "-m", "colorjax.main", *TRICKY,
                           ">logs/score.log", "2>&1", "</dev/null", "&"])


def test_tpu_old_form_is_run():
  old = commands(launch("tpu_pod.sh", *TRICKY, **TPU_ENV).stdout)
  assert old == commands(launch("tpu_pod.sh", "run", *TRICKY, **TPU_ENV).stdout)


def test_tpu_create():
  (argv,) = commands(launch("tpu_pod.sh", "create", SPOT=1, PROJECT="proj", **TPU_ENV).stdout)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod-1"]
  assert {"--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot", "--project=proj",
          "--zone=us-east5-a"} <= set(argv)
  (argv,) = commands(launch("tpu_pod.sh", "create", ACCELERATOR="v5litepod-16", RUNTIME="v2-alpha-tpuv5-lite",
                            CREATE_FLAGS="--reserved --network=n", **TPU_ENV).stdout)
  assert {"--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--reserved", "--network=n"} <= set(argv)
  assert "--spot" not in argv and not any(a.startswith("--project") for a in argv)


def test_tpu_create_with_a_command_compiles_it_for_the_slice_first():
  """The preflight (issue 30): every step of the command compiled for the slice on this machine, before gcloud
  reserves it; COMPILE_FOR names another topology, PYTHON the interpreter, PREFLIGHT=0 skips it."""
  preflight, create = commands(launch("tpu_pod.sh", "create", *TRICKY, **TPU_ENV).stdout)
  venv = REPO / ".venv" / "bin" / "python"
  assert preflight == [str(venv) if venv.exists() else "python3", "-m", "colorjax.main", *TRICKY,
                       "--config.compile_for=v5p-64", "--config.compile_estimate=False"]
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  preflight, _ = commands(launch("tpu_pod.sh", "create", *TRICKY, COMPILE_FOR="v5p:2x4x4", PYTHON="/opt/py/python",
                                 **TPU_ENV).stdout)
  assert preflight[0] == "/opt/py/python" and "--config.compile_for=v5p:2x4x4" in preflight
  (create,) = commands(launch("tpu_pod.sh", "create", *TRICKY, PREFLIGHT=0, **TPU_ENV).stdout)
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  (preflight,) = commands(launch("tpu_pod.sh", "preflight", *TRICKY, ACCELERATOR="v5litepod-16", PREFLIGHT=0,
                                 **TPU_ENV).stdout)
  assert preflight[-2:] == ["--config.compile_for=v5litepod-16", "--config.compile_estimate=False"]


@pytest.mark.parametrize("script,env", [("tpu_pod.sh", TPU_ENV), ("xpk_gke.sh", None)])
def test_a_failed_preflight_stops_before_the_slice_is_reserved(script, env, tmp_path):
  """The interpreter exits 2 (a step does not fit): the launcher stops with its line, and the cloud command never
  runs (here it would leave a file behind)."""
  marker = tmp_path / "reserved"
  cloud = tmp_path / "cloud"
  cloud.write_text(f"#!/bin/sh\ntouch {marker}\n")
  cloud.chmod(0o755)
  fail = tmp_path / "python"
  fail.write_text("#!/bin/sh\necho 'colorjax pretrain: error: does not fit a v5p:2x4x4 chip' >&2\nexit 2\n")
  fail.chmod(0o755)
  env = dict(env or XPK_ENV, DRY_RUN=0, PYTHON=fail, GCLOUD=cloud, XPK=cloud)
  proc = launch(script, "create", *TRICKY, check=False, **env)
  assert proc.returncode == 2 and "does not fit a v5p:2x4x4 chip" in proc.stderr
  assert "preflight: the command above does not compile for v5p-64" in proc.stderr and not marker.exists()


def test_tpu_setup_copies_the_checkout_and_installs_on_every_worker():
  scp, ssh = commands(launch("tpu_pod.sh", "setup", **TPU_ENV).stdout)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert scp[-1] == "pod-1:colorjax-checkout.tgz"
  assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in ssh
  remote = option(ssh, "--command")
  for piece in ("tar -xzf colorjax-checkout.tgz -C colorjax", "python3 -m venv .venv",
                ".venv/bin/pip install -q -r requirements.txt -e .", ".venv/bin/pip install -q jax\\[tpu\\]==0.10.2"):
    assert piece in remote
  assert shlex.split(remote)  # one well-formed shell command


def test_tpu_setup_from_git():
  (ssh,) = commands(launch("tpu_pod.sh", "setup", REPO_URL="https://example.org/colorjax.git", REF="v1",
                           APT_PACKAGES="python3.11 python3.11-venv", REMOTE_PYTHON="python3.11", **TPU_ENV).stdout)
  remote = option(ssh, "--command")
  for piece in ("apt-get install -y -qq python3.11 python3.11-venv", "git clone -q https://example.org/colorjax.git",
                "fetch -q origin v1", "python3.11 -m venv .venv", "pip install -q -r requirements.txt -e ."):
    assert piece in remote


def test_tpu_logs_ssh_stop_delete():
  (logs,) = commands(launch("tpu_pod.sh", "logs", LOG="logs/prior.log", WORKER=3, **TPU_ENV).stdout)
  assert "--worker=3" in logs and shlex.split(option(logs, "--command"))[-3:] == ["100", "-F", "logs/prior.log"]
  (ssh,) = commands(launch("tpu_pod.sh", "ssh", **TPU_ENV).stdout)
  assert "--worker=0" in ssh and "--command" not in ssh
  (stop,) = commands(launch("tpu_pod.sh", "stop", **TPU_ENV).stdout)
  assert "--worker=all" in stop and "pkill -TERM" in option(stop, "--command")
  (delete,) = commands(launch("tpu_pod.sh", "delete", YES=1, **TPU_ENV).stdout)
  assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod-1"] and "--quiet" in delete


@pytest.mark.parametrize("missing", ["TPU", "ZONE"])
@pytest.mark.parametrize("sub", ["create", "setup", "run"])
def test_tpu_missing_setting_is_named(missing, sub):
  env = {k: v for k, v in TPU_ENV.items() if k != missing}
  proc = launch("tpu_pod.sh", sub, *TRICKY, check=False, **env)
  assert proc.returncode != 0 and f"set {missing}" in proc.stderr and not proc.stdout


def test_tpu_unknown_subcommand_and_logs_without_log():
  proc = launch("tpu_pod.sh", "preflight", check=False, **TPU_ENV)
  assert proc.returncode != 0 and "preflight: give the colorjax arguments" in proc.stderr
  proc = launch("tpu_pod.sh", "launch", check=False, **TPU_ENV)
  assert proc.returncode != 0 and "unknown subcommand 'launch'" in proc.stderr
  proc = launch("tpu_pod.sh", "logs", check=False, **TPU_ENV)
  assert proc.returncode != 0 and "set LOG" in proc.stderr


def _no_srun():
  if shutil.which("srun"):
    pytest.skip("srun is installed here")


def test_slurm_dry_run():
  _no_srun()
  (argv,) = commands(launch("slurm_gpu.sbatch", *TRICKY, DRY_RUN=1, GPUS_PER_NODE=8).stdout)
  assert argv[:2] == ["XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"]
  assert argv[2:6] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", f"--chdir={REPO}"]
  assert argv[6:] == [str(REPO / ".venv/bin/python"), "-m", "colorjax.main", *TRICKY]


def test_slurm_keeps_what_the_user_set():
  _no_srun()
  (argv,) = commands(launch("slurm_gpu.sbatch", *TRICKY, DRY_RUN=1, XLA_PYTHON_CLIENT_MEM_FRACTION="0.7",
                            SLURM_GPUS_ON_NODE=4, SLURM_SUBMIT_DIR="/shared/colorjax", PYTHON="/opt/py/bin/python",
                            SRUN_FLAGS="--cpu-bind=none").stdout)
  assert argv[:2] == ["XLA_PYTHON_CLIENT_MEM_FRACTION=0.7", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
  assert contains(argv, ["--chdir=/shared/colorjax", "--cpu-bind=none", "/opt/py/bin/python", "-m", "colorjax.main"])


def test_slurm_needs_srun_and_arguments():
  _no_srun()
  proc = launch("slurm_gpu.sbatch", *TRICKY, GPUS_PER_NODE=8, check=False)
  assert proc.returncode != 0 and "srun not found" in proc.stderr
  proc = launch("slurm_gpu.sbatch", DRY_RUN=1, check=False)
  assert proc.returncode != 0 and "give the colorjax arguments" in proc.stderr


def test_slurm_defaults_are_sbatch_directives():
  text = (LAUNCH / "slurm_gpu.sbatch").read_text()
  for directive in ("--ntasks-per-node=1", "--gpus-per-node=8", "--signal=TERM@300"):
    assert f"#SBATCH {directive}\n" in text


XPK_ENV = dict(DRY_RUN=1, CLUSTER="tpu-cluster", WORKLOAD="prior-150m", IMAGE="gcr.io/proj/colorjax:v1")


def test_xpk_create():
  preflight_argv, argv = commands(launch("xpk_gke.sh", "create", *TRICKY, PROJECT="proj", ZONE="us-east5-a",
                                         **XPK_ENV).stdout)
  assert preflight_argv[1:] == ["-m", "colorjax.main", *TRICKY, "--config.compile_for=v5p-64",
                                "--config.compile_estimate=False"]
  assert argv[:3] == ["xpk", "workload", "create"]
  assert {"--cluster=tpu-cluster", "--workload=prior-150m", "--tpu-type=v5p-64", "--num-slices=1",
          "--docker-image=gcr.io/proj/colorjax:v1", "--project=proj", "--zone=us-east5-a"} <= set(argv)
  assert shlex.split(option(argv, "--command")) == ["cd", "/app", "&&", "python3", "-m", "colorjax.main", *TRICKY]
  (argv,) = commands(launch("xpk_gke.sh", "create", *TRICKY, TPU_TYPE="v5litepod-256", NUM_SLICES=2,
                            XPK_FLAGS="--env=WANDB_MODE=offline", PREFLIGHT=0, **XPK_ENV).stdout)
  assert {"--tpu-type=v5litepod-256", "--num-slices=2", "--env=WANDB_MODE=offline"} <= set(argv)


@pytest.mark.parametrize("missing", ["CLUSTER", "WORKLOAD", "IMAGE"])
def test_xpk_missing_setting_is_named(missing):
  env = {k: v for k, v in XPK_ENV.items() if k != missing}
  proc = launch("xpk_gke.sh", "create", *TRICKY, check=False, **env)
  assert proc.returncode != 0 and f"set {missing}" in proc.stderr and not proc.stdout


def test_xpk_list_logs_delete():
  (argv,) = commands(launch("xpk_gke.sh", "list", **XPK_ENV).stdout)
  assert argv == ["xpk", "workload", "list", "--cluster=tpu-cluster"]
  (argv,) = commands(launch("xpk_gke.sh", "delete", **XPK_ENV).stdout)
  assert argv == ["xpk", "workload", "delete", "--cluster=tpu-cluster", "--workload=prior-150m"]
  (argv,) = commands(launch("xpk_gke.sh", "logs", **XPK_ENV).stdout)
  assert argv[:2] == ["kubectl", "logs"] and "--selector=jobset.sigs.k8s.io/jobset-name=prior-150m" in argv


def test_xpk_dockerfile_and_build():
  dockerfile = launch("xpk_gke.sh", "build-image").stdout
  for line in ("FROM python:3.11-slim", "COPY requirements.txt ./", 'RUN pip install -r requirements.txt '
               '"jax[tpu]==0.10.2"', "COPY colorjax/ colorjax/", "COPY configs/ configs/", "RUN pip install --no-deps -e ."):
    assert line in dockerfile.splitlines()
  build, push = commands(launch("xpk_gke.sh", "build-image", BUILD=1, PUSH=1, **XPK_ENV).stdout)
  assert build[:4] == ["docker", "build", "-t", "gcr.io/proj/colorjax:v1"]
  assert push == ["docker", "push", "gcr.io/proj/colorjax:v1"]


def test_local_hosts_dry_run():
  lines = commands(launch("local_hosts.sh", *TRICKY, DRY_RUN=1, HOSTS=3, DEVICES=2, PORT=23456).stdout)
  assert len(lines) == 3
  for i, argv in enumerate(lines):
    assert {"JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2",
            "JAX_COORDINATOR_ADDRESS=localhost:23456", "JAX_NUM_PROCESSES=3", f"JAX_PROCESS_ID={i}"} <= set(argv)
    assert argv[-len(TRICKY) - 3:] == ["python3", "-m", "colorjax.main", *TRICKY]


# --- the header examples name only fields their configs have ---------------------------------------------------

_EXAMPLE = re.compile(r"--config[ =]configs/")


def header_examples(path: pathlib.Path) -> list[list[str]]:
  """The example command lines of a launcher's header comment (continuation lines joined), split into words."""
  lines = []
  for line in path.read_text().splitlines()[1:]:
    if not line.startswith("#"):
      break
    lines.append(re.sub(r"^#\s?", "", line))
  joined, current = [], ""
  for line in lines:
    if line.rstrip().endswith("\\"):
      current += line.rstrip()[:-1] + " "
    else:
      joined.append(current + line)
      current = ""
  return [shlex.split(line) for line in joined if _EXAMPLE.search(line)]


def config_args(words):
  """(name, value) of the --config file and each --config.<field>=value, as colorjax.main reads them."""
  return [(name, value) for name, value, _ in cli._config_args(["launcher", *words])]


@pytest.mark.parametrize("script,least", [("tpu_pod.sh", 2), ("slurm_gpu.sbatch", 2), ("xpk_gke.sh", 2),
                                          ("local_hosts.sh", 1)])
def test_header_examples_name_real_config_fields(script, least, monkeypatch):
  monkeypatch.chdir(REPO)  # config paths in the examples are relative to the checkout
  examples = header_examples(LAUNCH / script)
  assert len(examples) >= least, f"{script}: expected at least {least} examples in its header"
  for words in examples:
    found = config_args(words)
    assert found[0][0] == "config" and found[0][1].startswith("configs/"), words
    assert pathlib.Path(found[0][1].split(":")[0]).is_file(), found[0]
    assert len(found) > 1, f"{script}: an example with no field override: {words}"
    assert cli._unknown_override(found) is None, f"{script}: {cli._unknown_override(found)}"


def test_field_check_catches_a_wrong_field(monkeypatch):
  monkeypatch.chdir(REPO)
  message = cli._unknown_override(config_args(["--config", "configs/score.py:150m", "--config.score.stor=gs://b/c"]))
  assert message and "score.stor" in message


def test_examples_cover_the_prior_and_the_scoring_run():
  for script in ("tpu_pod.sh", "xpk_gke.sh"):
    specs = {config_args(words)[0][1] for words in header_examples(LAUNCH / script)}
    assert {"configs/pretrain.py:150m", "configs/score.py:150m"} <= specs, script
    assert all(v.startswith("gs://") for words in header_examples(LAUNCH / script)
               for name, v in config_args(words) if name in ("config.workdir", "config.data.train_store",
                                                             "config.score.store"))


def test_cluster_dry_run_prints_per_device_batch_memory_and_scoring_time():
  """The README's planning numbers for 32 devices (a v5p-64, or 4 nodes x 8 H100) and the paper's 175B-token pool."""
  out = run_cli(["--config", "configs/pipeline.py:paper-150m", "--config.dry_run=True",
                 "--config.dry_run_devices=32", "--config.workdir=/nonexistent/colorjax-dry-run"]).stdout
  score = out[out.index("score (dry run)"):]
  assert "342,000,000 sequences x 512 tokens" in score
  assert "(32 devices); per device: 8 sequences per step" in score
  assert "expected time: 3.3 h for 175,104,000,000 pool tokens at 464,000 pool tokens/s per device" in score
  assert float(re.search(r"activations ([\d.]+) GiB", score).group(1)) > 0
  assert "per device: 2 sequences x 4 micro-batch(es) per step" in out  # the 150M prior, 256 = 4 x 64 on 32
