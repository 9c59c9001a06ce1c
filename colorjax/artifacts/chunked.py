"""A float32 array written chunk by chunk, resumable and checked: `values.npy` [n], `done.npy` (uint8 per chunk) and
`crc32.npy` (uint32 per chunk: the CRC-32 of the chunk's bytes, written before its done flag).

A killed writer resumes where it stopped and ends with the bytes of an uninterrupted one. Every file's size is
checked before it is opened (numpy's r+ mode would silently extend a truncated file with zeros); a done chunk whose
bytes no longer match its CRC (a disk fault, an edit) is written again by the next writer and refused by a reader.
The distill stage keeps its pool predictions in one.
"""
import pathlib
import zlib

import numpy as np

from colorjax import errors

CHECKSUMS = "crc32.npy"
DONE = "done.npy"


def _open_npy(path: pathlib.Path, dtype, shape: tuple, fix: str, mode: str = "r"):
  """A memmap of an .npy file that must hold `dtype[shape]`, checked before it is opened."""
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      header = read(f)
      offset = f.tell()
  except FileNotFoundError as e:
    raise errors.DataError(f"{path} is missing; {fix}") from e
  except (ValueError, EOFError, OSError) as e:
    raise errors.DataError(f"{path} is not a readable .npy file ({e}); {fix}") from e
  want = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
  if tuple(header[0]) != tuple(shape) or np.dtype(header[2]) != np.dtype(dtype) or path.stat().st_size != want:
    raise errors.DataError(f"{path} holds {np.dtype(header[2])}{list(header[0])} in {path.stat().st_size:,} bytes, "
                           f"not {np.dtype(dtype)}{list(shape)} in {want:,} (truncated or replaced); {fix}")
  return np.lib.format.open_memmap(path, mode=mode)


def crc(values, first: int, stop: int) -> int:
  return zlib.crc32(np.ascontiguousarray(values[first:stop], np.float32).tobytes())


class ChunkedArray:
  """The three files of one array in `folder` (`name`: the values file), `chunk_rows` rows a chunk."""

  def __init__(self, folder: pathlib.Path, name: str, n: int, chunk_rows: int):
    self.folder, self.name, self.n, self.rows = pathlib.Path(folder), name, int(n), int(chunk_rows)
    self.chunks = -(-self.n // self.rows)
    self.fix = f"delete {self.folder} and re-run (it is computed again; nothing else is lost)"

  def bounds(self, chunk: int) -> tuple[int, int]:
    return int(chunk) * self.rows, min(self.n, (int(chunk) + 1) * self.rows)

  def create(self) -> None:
    self.folder.mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(self.folder / self.name, mode="w+", dtype=np.float32, shape=(self.n,)).flush()
    np.save(self.folder / DONE, np.zeros(self.chunks, np.uint8))
    np.save(self.folder / CHECKSUMS, np.zeros(self.chunks, np.uint32))

  def _arrays(self, mode: str):
    return (_open_npy(self.folder / self.name, np.float32, (self.n,), self.fix, mode),
            _open_npy(self.folder / DONE, np.uint8, (self.chunks,), self.fix, mode),
            _open_npy(self.folder / CHECKSUMS, np.uint32, (self.chunks,), self.fix, mode))

  def damaged(self, values, done, sums) -> list[int]:
    """Done chunks whose bytes no longer match their CRC-32."""
    return [int(c) for c in np.nonzero(done)[0] if crc(values, *self.bounds(c)) != sums[c]]

  def write(self, compute, watch=None) -> int:
    """Computes every chunk not done (damaged ones again): `compute(first, stop)` -> float32 values. `watch` (a
    preemption.Watch) is asked after each chunk; returns the chunks still to do when it said stop (0: finished)."""
    values, done, sums = self._arrays("r+")
    damaged = self.damaged(values, done, sums)
    if damaged:
      print(f"{self.folder / self.name}: {len(damaged)} chunk(s) no longer match their CRC-32 (chunks "
            f"{damaged[:8]}{' ...' if len(damaged) > 8 else ''}); computing them again")
      done[damaged] = 0
      done.flush()
    todo = np.nonzero(done == 0)[0]
    for i, chunk in enumerate(todo):
      first, stop = self.bounds(chunk)
      block = np.asarray(compute(first, stop), np.float32)
      if block.shape != (stop - first,) or not np.isfinite(block).all():
        raise errors.DataError(f"{self.folder / self.name}: chunk {int(chunk)} computed {block.shape} values "
                               f"{'with non-finite ones' if block.size == stop - first else ''}; nothing of it was "
                               "written")
      values[first:stop] = block
      values.flush()
      sums[chunk] = crc(block, 0, block.size)
      sums.flush()
      done[chunk] = 1
      done.flush()
      if watch is not None and watch.check()[0] and i + 1 < todo.size:
        return int(todo.size - i - 1)
    return 0

  def open(self) -> np.ndarray:
    """The values (read-only), every chunk done and matching its CRC-32, or a DataError naming the fix."""
    values, done, sums = self._arrays("r")
    if not done.all():
      raise errors.DataError(f"{self.folder}: {int((done == 0).sum())} of {self.chunks} chunks are not computed yet; "
                             "re-run the same command to finish them")
    damaged = self.damaged(values, done, sums)
    if damaged:
      first, _ = self.bounds(damaged[0])
      raise errors.DataError(f"{self.folder / self.name}: chunk {damaged[0]} (rows {first:,}..) does not match its "
                             "CRC-32 (damaged since it was written); re-run the same command: it computes damaged "
                             "chunks again")
    return values

  def done_count(self) -> int:
    return int(self._arrays("r")[1].sum())
