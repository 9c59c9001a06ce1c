"""What a person sees: which process speaks (process 0 of a multi-host job), progress bars on stderr, and numbers
written for humans."""
import sys
import time

import jax


def is_main() -> bool:
  return jax.process_index() == 0


def on_main_then_sync(fn, name: str):
  """Run fn on process 0 only (e.g. writing a shared artifact), then let every process continue; returns fn()'s
  result on process 0 and None elsewhere."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  result = fn() if is_main() else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
  return result


def human(n: float) -> str:
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"


class Progress:
  """A one-line progress bar on stderr (a line per update when stderr is not a terminal, at most every 10 s)."""

  def __init__(self, total, unit: str = "it", desc: str = "", enabled: bool | None = None):
    self.total, self.unit, self.desc = total, unit, desc
    self.count = 0
    self.start = time.time()
    self._last_print = 0.0
    self._printed_count = None  # count at the last printed line, so close() does not repeat it
    self.enabled = is_main() if enabled is None else enabled
    self._tty = sys.stderr.isatty()

  @property
  def elapsed(self) -> float:
    return time.time() - self.start

  def update(self, n: int = 1, extra: str = "", force: bool = False):
    self.count += n
    now = time.time()
    interval = 0.2 if self._tty else 10.0
    if not self.enabled or (not force and now - self._last_print < interval):
      return
    self._last_print = now
    self._printed_count = self.count
    rate = self.count / max(self.elapsed, 1e-9)
    if self.total:
      frac = min(1.0, self.count / self.total)
      filled = int(frac * 24)
      eta = (self.total - self.count) / rate if rate else 0
      head = f"{self.desc} [{'#' * filled}{'.' * (24 - filled)}] {self.count:,}/{self.total:,} {self.unit}"
      line = f"{head} ({frac:.0%}, {rate:,.1f} {self.unit}/s, eta {eta:,.0f}s)"
    else:
      line = f"{self.desc} {self.count:,} {self.unit} ({rate:,.1f} {self.unit}/s)"
    if extra:
      line += f" {extra}"
    sys.stderr.write(("\r" + line + "\x1b[K") if self._tty else line + "\n")
    sys.stderr.flush()

  def close(self, extra: str = ""):
    if extra or self._printed_count != self.count:
      self.update(0, extra=extra, force=True)
    if self.enabled and self._tty:
      sys.stderr.write("\n")
      sys.stderr.flush()
