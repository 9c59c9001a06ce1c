"""The command line: user errors are one `colorjax <stage>: error:` block and exit 2, bugs keep their traceback,
a repeated override's last value wins, and the installed package runs from any directory."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

USAGE_EXIT = 2


def assert_one_error_block(proc, message):
  """Exit 2, the message on one `error:` line, and no traceback around it."""
  assert proc.returncode == USAGE_EXIT, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]


def test_stage_user_error_is_one_block(tmp_path):
  proc = run_cli(["--config", "configs/select.py:color,16", "--config.select.scores=/nonexistent",
                  f"--config.workdir={tmp_path / 'sel'}"], check=False)
  assert_one_error_block(proc, "colorjax select: error: /nonexistent does not exist")


def test_unknown_override_is_one_block_with_a_suggestion():
  proc = run_cli(["--config", "configs/pretrain.py:tiny", "--config.train.lrr=1", "--config.dry_run=True"],
                 check=False)
  assert_one_error_block(proc, "--config.train.lrr: config has no field 'train.lrr'; did you mean --config.train.lr?")


def test_unknown_preset_and_missing_config_file_are_one_block(tmp_path):
  proc = run_cli(["--config", "configs/pipeline.py:nosuch", "--config.dry_run=True"], check=False)
  assert_one_error_block(proc, "unknown pipeline preset 'nosuch'")
  proc = run_cli(["--config", "configs/nosuch.py", "--config.dry_run=True"], check=False)
  assert_one_error_block(proc, "--config configs/nosuch.py: no such file")


def test_repeated_override_last_wins_and_a_tuple_is_replaced(tmp_path):
  """As absl does for every flag: a wrapper script's default, then the user's value; a tuple is never appended."""
  work = tmp_path / "work"
  proc = run_cli(["--config", "configs/pipeline.py:demo", "--noconfig.dry_run", f"--config.workdir={work}",
                  "--config.pipeline.taus=(8.0, 2.0)", "--config.pipeline.taus=(4.0,)", "--config.dry_run=True",
                  "--config.pipeline.seeds=(0, 1)", "--config.pipeline.seeds=(3,)"])
  assert "taus [4.0], seeds [3]," in proc.stdout, proc.stdout[-2000:]
  assert not work.exists()


def test_a_bug_in_a_config_file_keeps_its_traceback(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("from colorjax import config\n\n\ndef get_config():\n"
                    "  return config.get_config().no_such_section\n")
  proc = run_cli(["--config", str(broken), "--config.dry_run=True"], check=False)
  assert proc.returncode not in (0, USAGE_EXIT)
  assert "Traceback" in proc.stderr and "no_such_section" in proc.stderr


def test_installed_package_runs_from_another_directory(tmp_path):
  try:
    importlib.metadata.version("colorjax")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("colorjax is not installed in this environment: run `pip install -e .` as the README does")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the installed package, not the checkout
  args = ["--config", f"{REPO / 'configs' / 'select.py'}:color,16", "--config.dry_run=True",
          f"--config.select.scores={tmp_path / 'none'}", f"--config.workdir={tmp_path / 'sel'}"]
  proc = subprocess.run([sys.executable, "-m", "colorjax.main", *args], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
  assert "ModuleNotFoundError" not in proc.stderr, proc.stderr[-3000:]
  assert_one_error_block(proc, f"colorjax select: error: {tmp_path / 'none'}")


def test_malformed_pipeline_lists_are_one_block():
  """Issue 21.1/21.2: a list setting of the wrong type, a fractional seed, and curve_tau are named as given."""
  cases = {"--config.pipeline.taus=abc": "pipeline.taus=('abc',): give a tuple of numbers",
           "--config.pipeline.taus=('a',)": "pipeline.taus=('a',): give a tuple of numbers",
           "--config.pipeline.seeds=(0.5,)": "pipeline.seeds=(0.5,): give a tuple of integers",
           "--config.pipeline.seeds=(0, 0.5)": "pipeline.seeds=(0, 0.5): give a tuple of integers",
           "--config.pipeline.curve_tau=0.5": "pipeline.curve_tau=0.5: keep the top 1/tau of the pool"}
  for flag, message in cases.items():
    proc = run_cli(["--config", "configs/pipeline.py:demo", "--config.dry_run=True", flag], check=False)
    assert_one_error_block(proc, message)


def test_an_output_path_that_cannot_be_a_folder_is_one_block(tmp_path):
  """Issue 21.1: --config.workdir naming a file (or a folder under a file) is one line naming the path."""
  afile = tmp_path / "afile"
  afile.write_text("x")
  for workdir, reason in ((afile, "File exists"), (afile / "sub", "Not a directory")):
    proc = run_cli(["--config", "configs/pipeline.py:demo", f"--config.workdir={workdir}"], check=False)
    assert_one_error_block(proc, f"colorjax pipeline: error: {workdir}: {reason}; every output")
  assert afile.read_text() == "x"


def test_read_only_and_full_disks_say_what_to_do(capsys):
  """Issue 21.1: a read-only folder is a user error (exit 2); a full disk says what is kept and that a re-run
  resumes (exit 1); any other OSError stays a bug with its traceback."""
  import errno  # pylint: disable=import-outside-toplevel
  from colorjax import main  # pylint: disable=import-outside-toplevel
  for code, exit_code, said in ((errno.EROFS, 2, "Read-only file system; every output"),
                                (errno.ENOSPC, 1, "no space left on the device while writing /w/x.npy. What the "
                                                  "stage finished is kept")):
    with pytest.raises(SystemExit) as stop:
      main._os_error("score", OSError(code, os.strerror(code), "/w/x.npy"))
    assert stop.value.code == exit_code and said in capsys.readouterr().err
  with pytest.raises(OSError):
    main._os_error("score", OSError(errno.EIO, "Input/output error", "/w/x.npy"))
