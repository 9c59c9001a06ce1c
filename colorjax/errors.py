"""The project's own error kinds: a user can fix them, so `main` prints one clear block and exits 2 (bugs keep
their traceback). Both subclass ValueError, so callers that catch ValueError keep working."""


class ColorjaxError(ValueError):
  """An expected user error: bad config, bad input data, or an artifact that does not fit."""


class ConfigError(ColorjaxError):
  """A config value is missing, malformed or inconsistent with another."""


class DataError(ColorjaxError):
  """A data artifact is missing, corrupt or does not match what the stage expects."""


class LockedError(DataError):
  """Another process is writing the artifact this process wants to write."""


class Preempted(Exception):
  """The job was asked to stop (SIGTERM / a preemption notice, or Ctrl-C) and stopped cleanly at a step boundary;
  `main` prints the message (how to resume) and exits with 128 + the signal (143, or 130 for Ctrl-C). Not a
  ColorjaxError: nothing needs fixing."""

  def __init__(self, message: str, step: int, signum: int = 15):
    super().__init__(message)
    self.step, self.signum = step, int(signum)
