"""The streaming encoder: folder scan -> decode workers -> bounded queue -> runner -> codes.npy.

    result = encode_folder("photos/", "codes.npy", runner, batch=32)

* Rows are the scanned files in byte order of their relative paths, so two runs over the same
  folder give the same file. Every file is a row or a skip with its reason (`codes.npy.json`).
* Decoding runs in `workers` threads (or processes) on chunks of `batch` files; at most
  `prefetch` chunks are in flight, so the image data held stays bounded however large the
  folder (what grows is under 1 KB per file: its path, code and state), and the main thread
  runs inference on one chunk while the workers decode the next ones. Threads are the default:
  Pillow releases the GIL while decoding and resizing, and threads measured faster than
  processes, which pay for start-up and for pickling every batch (bench/encode_bench.py measures
  both; README, "Measured (export and encode)").
* Progress is saved to the folder `codes.npy.partial` (each file in it atomically, every
  `checkpoint_seconds` and on any error or Ctrl-C). `resume=True` reuses every finished file
  whose size and mtime are unchanged and encodes the rest; the result equals an uninterrupted
  run. `--resume` checks the state before using any of it: its format, image folder and model,
  and every entry (sizes, a code of exactly the model's length in hex, or a skip reason); a
  damaged state is refused, naming its file. The partial state is removed once codes.npy is
  written, and on the failures that write nothing (`strict` skips, no image encoded).
* codes.npy and codes.npy.json are replaced as one unit (`codes.write_codes`): a failed write
  leaves the previous pair as it was. While a run lasts it holds an exclusive lock beside the
  output (`.codes.npy.lock`), so a second run to the same output is refused instead of racing it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsah_rt.atomic import check_outputs, lock_path, output_lock, write_json
from dsah_rt.codes import manifest_path, write_codes
from dsah_rt.errors import UserError, display_path
from dsah_rt.images import MAX_PIXELS, Scan, Skip, decode_batch, scan, skip_reason, sort_key
from dsah_rt.runners.base import Runner

STATE_FORMAT = "dsah-rt-encode-state/1"
POOLS = ("thread", "process")
_HEX = re.compile("[0-9a-f]*")
Progress = Callable[[int, int], None]


class EncodeError(UserError):
    """Nothing to encode, nothing encoded, or skips under --strict."""


@dataclass
class EncodeResult:
    out: Path | None
    rows: list[str]
    codes: np.ndarray
    skipped: list[Skip]
    encoded: int  # images run through the model by this call
    reused: int  # images taken from a partial state (--resume)
    seconds: float
    runner: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        rate = self.encoded / self.seconds if self.seconds > 0 else 0.0
        text = f"{len(self.rows)} images encoded, {len(self.skipped)} skipped"
        if self.reused:
            text += f" ({self.reused} reused from the partial run)"
        return text + f" in {self.seconds:.1f} s ({rate:.1f} images/s)"


def state_path(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def _executor(kind: str, workers: int) -> Executor:
    if kind == "thread":
        return ThreadPoolExecutor(workers, thread_name_prefix="dsah-decode")
    if kind == "process":
        # forkserver, not fork: the parent already runs inference threads (ONNX Runtime, torch),
        # and forking a threaded process can copy a held lock into the child.
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
    raise UserError(f"unknown worker pool {kind!r}; choose one of {', '.join(POOLS)}")


def decoded_chunks(
    root: Path, rels: list[str], size: int, chunk: int, workers: int, pool: str = "thread",
    max_pixels: int = MAX_PIXELS, prefetch: int | None = None,
) -> Iterator[tuple[list[str], np.ndarray, list[str | None]]]:  # fmt: skip
    """(chunk of rels, decoded images [n_ok, 3, S, S], None-or-reason per rel), in order.

    At most `prefetch` chunks (default 2 per worker) are decoded ahead of the consumer.
    """
    prefetch = prefetch or 2 * workers
    pieces = [rels[i : i + chunk] for i in range(0, len(rels), chunk)]
    with _executor(pool, workers) as executor:
        queue: deque[tuple[list[str], Future]] = deque()
        try:
            for piece in pieces:
                queue.append((piece, executor.submit(decode_batch, str(root), piece, size, max_pixels)))
                if len(queue) >= prefetch:
                    done, future = queue.popleft()
                    yield (done, *future.result())
            while queue:
                done, future = queue.popleft()
                yield (done, *future.result())
        finally:
            for _, future in queue:
                future.cancel()


class _State:
    """Finished files of an interrupted run: rel -> [size, mtime_ns, code hex or None, skip reason or None].

    On disk a folder: `state.json` (format, image folder, model) and one `entries-NNNNNN.json`
    per checkpoint holding only the files finished since the previous one, each written
    atomically. A checkpoint costs what it adds, not the whole run so far, and a later segment
    overrides an earlier one for the same file. With `path` None (nothing is written, e.g.
    search queries) it only holds the entries. `nbytes` is the length of a packed code.
    """

    def __init__(self, path: Path | None, root: Path, model: dict[str, Any], nbytes: int) -> None:
        self.path, self.root, self.model, self.nbytes = path, root, model, nbytes
        self.entries: dict[str, list[Any]] = {}
        self._unsaved: dict[str, list[Any]] = {}
        self._segments = 0
        self.saved_at = time.monotonic()

    def open(self, resume: bool, log: Callable[[str], None]) -> None:
        if self.path is None:
            return
        if not self.path.exists():
            if resume:
                log("nothing to resume: no partial state found, encoding from the start")
            return
        if not resume:
            log(f"discarding the partial state {self.path.name} of an earlier run (--resume continues one)")
            self.remove()
            return
        try:
            header = json.loads((self.path / "state.json").read_text())
            segments = sorted(self.path.glob("entries-*.json"))
            for segment in segments:
                self.entries.update(self._checked(segment, json.loads(segment.read_text())))
        except (OSError, ValueError) as exc:
            raise EncodeError(f"{self.path}: unreadable partial state ({exc}); delete it to start over") from None
        if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
            raise EncodeError(f"{self.path}: not a dsah-rt partial state; delete it to start over")
        if header.get("root") != str(self.root):
            raise EncodeError(f"{self.path}: the interrupted run encoded {header.get('root')}; rerun without --resume")
        if header.get("model") != self.model:
            raise EncodeError(f"{self.path}: the interrupted run used another model or backend; rerun without --resume")
        self._segments = len(segments)
        log(f"resuming: {len(self.entries)} files already done in {self.path.name}")

    def _checked(self, segment: Path, entries: Any) -> dict[str, list[Any]]:
        """`entries` of one segment file when each is one a run writes, else EncodeError naming it:
        a code of the wrong length would shift every later row of codes.npy by its excess."""
        if not isinstance(entries, dict):
            raise EncodeError(f"{segment}: damaged partial state (not a JSON object); delete {self.path} to start over")
        for rel, entry in entries.items():
            problem = self._entry_problem(entry)
            if problem:
                raise EncodeError(
                    f"{segment}: damaged partial state ({display_path(rel)}: {problem}); delete {self.path} to start over"
                )
        return entries

    def _entry_problem(self, entry: Any) -> str | None:
        """What is wrong with a [size, mtime_ns, code hex or None, reason or None] entry, or None."""
        if not isinstance(entry, list) or len(entry) != 4:
            return "not a [size, mtime, code, reason] entry"
        size, mtime, code, reason = entry
        if type(size) is not int or type(mtime) is not int:  # bool is an int subclass but no size
            return "size and mtime must be integers"
        if code is None:
            return None if isinstance(reason, str) and reason else "neither a code nor a skip reason"
        if reason is not None:
            return "both a code and a skip reason"
        if not isinstance(code, str) or len(code) != 2 * self.nbytes or not _HEX.fullmatch(code):
            return f"code is not {2 * self.nbytes} lowercase hex digits"
        return None

    def keep_unchanged(self, stats: dict[str, list[int]]) -> None:
        """Reuse only what was finished on the very same file (same size and mtime) still present."""
        self.entries = {rel: e for rel, e in self.entries.items() if stats.get(rel) == e[:2]}

    def record(self, rel: str, entry: list[Any]) -> None:
        self.entries[rel] = self._unsaved[rel] = entry

    def save(self) -> None:
        self.saved_at = time.monotonic()
        if self.path is None or not self._unsaved:
            return
        if not self.path.is_dir():
            self.path.mkdir()
            write_json(self.path / "state.json", {"format": STATE_FORMAT, "root": str(self.root), "model": self.model})
        write_json(self.path / f"entries-{self._segments:06d}.json", self._unsaved)
        self._segments += 1
        self._unsaved = {}

    def save_every(self, seconds: float) -> None:
        if time.monotonic() - self.saved_at > seconds:
            self.save()

    def remove(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def model_record(runner: Runner) -> dict[str, Any]:
    """The manifest's `model`: the model's identity and what ran it, as JSON would read it back."""
    described = runner.describe()
    record = {**runner.info.identity(), "backend": described["backend"], "precision": described.get("precision")}
    return json.loads(json.dumps(record))


def check_paths(
    images: str | os.PathLike[str], out: str | os.PathLike[str] | None, batch: int
) -> tuple[Path, Path | None]:
    """(source, out) as Paths after the checks every engine makes before taking the output's lock."""
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    out = Path(out) if out is not None else None
    source = Path(images)
    if out is not None:
        check_outputs([out], [source])
        if source.is_dir() and out.resolve().is_relative_to(source.resolve()) and out.is_file() and skip_reason(out) is None:
            raise EncodeError(f"{out}: is one of the images under {source}; choose another output path")
    if not source.exists():
        raise EncodeError(f"{source}: no such file or folder")
    return source, out


def scan_inputs(source: Path, out: Path | None) -> tuple[Path, Scan]:
    """(root, scan) of `source`, leaving out the encoder's own files beside `out`; EncodeError when empty."""
    root = source if source.is_dir() else source.parent
    own = (out, manifest_path(out), state_path(out), lock_path(out)) if out is not None else ()
    found = scan(source, exclude=frozenset(os.path.relpath(p, root) for p in own))
    if not found.files and not found.skipped:
        raise EncodeError(f"{source}: no files to encode (empty folder)")
    return root, found


def collect_rows(
    stats: dict[str, list[int]], entries: dict[str, list[Any]], skipped: list[Skip], nbytes: int, strict: bool
) -> tuple[list[str], np.ndarray, list[Skip]]:
    """(rows, packed codes, every skip sorted) from the finished `entries` of the files in `stats`,
    in scan order; EncodeError when no image was encoded, or on any skip with `strict`."""
    rows = [rel for rel in stats if entries[rel][2] is not None]
    skipped = sorted(
        [*skipped, *(Skip(rel, entries[rel][3]) for rel in stats if entries[rel][2] is None)],
        key=lambda s: sort_key(s.path),
    )
    hexes = "".join(entries[rel][2] for rel in rows)
    packed = np.frombuffer(bytes.fromhex(hexes), np.uint8).reshape(len(rows), nbytes)
    if not rows or (strict and skipped):
        total = len(rows) + len(skipped)
        failure = f"--strict: {len(skipped)} of {total} files skipped" if rows else "no image could be encoded"
        raise EncodeError(failure + (f": {first_skips(skipped)}" if skipped else ""))
    return rows, packed, skipped


def stat_files(root: Path, files: list[str]) -> tuple[dict[str, list[int]], list[Skip]]:
    """(rel -> [size, mtime_ns]) of `files` under `root`, and a skip for each that cannot be stat'ed."""
    stats, skipped = {}, []
    for rel in files:
        try:
            st = (root / rel).stat()
            stats[rel] = [st.st_size, st.st_mtime_ns]
        except OSError as exc:
            skipped.append(Skip(rel, f"cannot stat: {exc.strerror or exc}"))
    return stats, skipped


def encode_folder(
    images: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    runner: Runner,
    batch: int = 32,
    workers: int | None = None,
    pool: str = "thread",
    resume: bool = False,
    strict: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda message: None,
    checkpoint_seconds: float = 10.0,
    max_pixels: int = MAX_PIXELS,
) -> EncodeResult:
    """Encode every image under `images` (a folder or one file) with `runner`; see the module docstring.

    `out=None` encodes without writing anything (queries for search). Raises EncodeError when
    there is no file, when no file could be encoded, or on any skip with `strict`; codes.npy is
    then not written, and no partial state is left. Raises OutputError when another run holds
    the output's lock.
    """
    start = time.perf_counter()
    source, out = check_paths(images, out, batch)
    # Held to the end: two runs to one output would share its partial state and race its rename.
    with output_lock(out) if out is not None else nullcontext():
        root, found = scan_inputs(source, out)
        model = model_record(runner)
        state = _State(state_path(out) if out is not None else None, root.resolve(), model, runner.info.nbytes)
        state.open(resume, log)
        stats, skipped = stat_files(root, found.files)
        state.keep_unchanged(stats)
        entries = state.entries
        todo = [rel for rel in stats if rel not in entries]
        reused, encoded = len(entries), 0
        if progress:
            progress(reused, len(stats))
        chunks = decoded_chunks(root, todo, runner.info.input_size, batch, workers or default_workers(), pool, max_pixels)
        try:
            for rels, decoded, reasons in chunks:
                ok = iter(runner.infer(decoded) if len(decoded) else ())
                for rel, reason in zip(rels, reasons):
                    code = None if reason else next(ok).tobytes().hex()
                    state.record(rel, [*stats[rel], code, reason])
                encoded += len(decoded)
                if progress:
                    progress(len(entries), len(stats))
                state.save_every(checkpoint_seconds)
        except BaseException:
            state.save()
            raise

        try:
            rows, packed, skipped = collect_rows(stats, entries, [*found.skipped, *skipped], runner.info.nbytes, strict)
        except EncodeError:
            state.remove()  # these failures write nothing, as --strict promises, not even a state to resume
            raise
        if out is not None:
            write_codes(out, packed, runner.info.bits, rows, [s.as_dict() for s in skipped], model)
            state.remove()
        seconds = time.perf_counter() - start
        return EncodeResult(out, rows, packed, skipped, encoded, reused, seconds, runner.describe())


def first_skips(skipped: list[Skip], n: int = 3) -> str:
    """The first `n` skipped files with their reasons, for a one-line error: 'a.jpg: why; b: why; ...'."""
    shown = "; ".join(f"{display_path(s.path)}: {s.reason}" for s in skipped[:n])
    return shown + ("; ..." if len(skipped) > n else "")

