"""`encode --engine ray`: the same rows, skips and codes as `encode_folder`, on Ray Data.

    result = encode_ray("photos/", "codes.parquet", runner, "model.onnx", backend="ort-cpu")
    result = encode_ray("paths.txt", "codes.parquet", runner, "model.onnx")  # a list of paths or URIs

* The driver scans and stats the folder exactly as `encode_folder` does (same exclusions, same
  skip reasons), takes the same output lock, and writes through the same `write_codes`.
* Ray Data runs two stages over the relative paths: read and decode each file with
  `images.decode_batch` (the project's decode, not Ray's `read_images`, whose conversions differ
  from training), then an actor pool of runners (`make_runner`, any backend). Ray fuses the two
  into the actors, so each actor decodes the batches it encodes. Ray Data does not
  keep row order, so every row carries its path (as bytes: a Linux name need not be UTF-8), and
  the driver puts the rows back in scan order.
* IMAGES may instead be a list file, `*.txt`: one path or URI per line (s3://bucket/a.jpg,
  file:///data/b.png, /data/c.jpg, or a path relative to the list file's folder), surrounding
  blanks stripped, blank lines and lines starting with # ignored, a repeated entry kept once.
  The workers open each entry through `pyarrow.fs.FileSystem.from_uri`, so a cluster reads
  s3:// (or gs://, hdfs://) directly; the driver reads only the list. Rows and skips hold the
  entry as written, in the list's order; an entry that cannot be opened or decoded is a skip
  with its reason, as a folder's bad file is. Only this engine reads list files.
* A worker that dies mid-run (its process killed, out of memory, its node lost) is restarted,
  and the batches it held are run again from their paths, up to `TASK_RETRIES` times each; rows
  are keyed by path on the driver, so none is lost or kept twice. A batch that kills its worker
  every time fails the run with one line, and nothing is written.
* Every (path, code or reason) row is gathered on the driver before writing: memory there grows
  with the folder (about 0.2 KB a file), as in `encode_folder`.
* Without `address` a local Ray is started in-process on this machine's cores; actors and decode
  tasks each reserve half a CPU, because whole-CPU actors on 2 cores leave no CPU for the decode
  tasks that feed them and the pipeline waits forever, silently. With `address` ("auto",
  "ray://...") the images must be readable at the same path on every node.
* `resume=True` keeps the rows of an existing output (`.npy` or `.parquet`) whose files are still
  there (for a list file: still listed) and encodes only the others. The output holds no size or
  mtime, so a file changed in place since keeps its old code; skipped files are tried again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dsah_rt.atomic import output_lock
from dsah_rt.codes import read_codes, write_codes
from dsah_rt.encode import EncodeError, EncodeResult, Progress, check_paths, collect_rows, model_record, scan_inputs, stat_files
from dsah_rt.errors import UserError, display_path
from dsah_rt.images import MAX_PIXELS, ImageSkip, decode_batch

if TYPE_CHECKING:
    from dsah_rt.runners.base import Runner

# Half a CPU for each actor and decode task: see the module docstring.
CPU_SHARE = 0.5
# Runs of one batch after the first when its worker dies (Ray's max_task_retries); actors restart
# without limit (max_restarts=-1): what stops a batch that kills every worker is this bound.
TASK_RETRIES = 3
LIST_SUFFIX = ".txt"
# Tests only: the path of a file; the first batch whose worker removes it kills that worker
# (os._exit), once, to show that its rows are run again. Unset in production: one environ lookup.
DIE_ONCE_ENV = "DSAH_RT_TEST_RAY_DIE_ONCE"


def is_list_file(source: str | os.PathLike[str]) -> bool:
    """True when IMAGES names a list of paths (`*.txt`, a file) rather than a folder or an image."""
    return Path(source).suffix == LIST_SUFFIX and Path(source).is_file()


def read_list(source: Path, log: Callable[[str], None] = lambda message: None) -> list[str]:
    """The entries of a list file in order (see the module docstring); EncodeError when none or unreadable."""
    try:
        text = source.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise EncodeError(f"{source}: cannot read the list of paths: {exc.strerror or exc}") from None
    entries = [line.strip() for line in text.splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    unique = list(dict.fromkeys(entries))
    if not unique:
        raise EncodeError(f"{source}: no paths listed (only blank lines and # comments)")
    if len(unique) < len(entries):
        log(f"{display_path(source)}: {len(entries) - len(unique)} repeated entries encoded once")
    return unique


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_entry(entry: str, base: str) -> bytes:
    """The bytes of a listed path or URI through pyarrow's file systems; ImageSkip(reason) if unreadable.

    A local path that is not absolute is taken relative to `base`, the list file's folder."""
    import pyarrow.fs

    target = entry if "://" in entry or os.path.isabs(entry) else os.path.join(base, entry)
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(target)
        with fs.open_input_file(path) as f:
            return f.read()
    except FileNotFoundError:
        raise ImageSkip("no such file") from None
    except PermissionError:
        raise ImageSkip("permission denied") from None
    except Exception as exc:  # OSError, ArrowInvalid (no file system for the URI), ArrowNotImplementedError, ...
        raise ImageSkip(f"cannot read: {_one_line(exc)}") from None


def decode_listed(
    base: str, entries: list[str], size: int, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, list[str | None]]:
    """`images.decode_batch` for the entries of a list file: (images [n_ok, 3, S, S], None or reason per entry)."""
    return decode_batch(base, entries, size, max_pixels, read=lambda entry: read_entry(entry, base))


def _die_once_for_tests() -> None:
    """See DIE_ONCE_ENV: removing the file is atomic, so exactly one batch of one worker dies."""
    fuse = os.environ.get(DIE_ONCE_ENV)
    if fuse:
        try:
            os.unlink(fuse)
        except FileNotFoundError:
            return
        os._exit(1)


def _decode(batch: dict[str, np.ndarray], root: str, size: int, max_pixels: int, listed: bool) -> dict[str, np.ndarray]:
    """Ray task: decoded images of a batch of paths (under `root`, or entries of a list file in the
    folder `root` when `listed`), a zero image and the reason for each skipped file."""
    rels = [os.fsdecode(p) for p in batch["path"]]
    decoded, reasons = (decode_listed if listed else decode_batch)(root, rels, size, max_pixels)
    images = np.zeros((len(rels), 3, size, size), np.uint8)
    ok = np.array([r is None for r in reasons], bool)
    images[ok] = decoded
    return {"path": batch["path"], "image": images, "reason": np.array([r or "" for r in reasons], object)}


class _Encoder:
    """Ray actor: one runner for its lifetime; codes of the decoded rows, zeros where a reason is set."""

    def __init__(self, model_path: str, backend: str, threads: int | None) -> None:
        from dsah_rt.runners import make_runner

        self.runner = make_runner(model_path, backend, threads=threads)
        # Each worker records what ran it: with --backend auto a GPU node picks another backend than the driver.
        self.model = json.dumps(model_record(self.runner), sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _die_once_for_tests()
        ok = batch["reason"] == ""
        codes = np.zeros((len(ok), self.runner.info.nbytes), np.uint8)
        if ok.any():
            codes[ok] = self.runner.infer(np.ascontiguousarray(batch["image"][ok]))
        return {"path": batch["path"], "code": codes, "reason": batch["reason"], "model": np.full(len(ok), self.model, object)}


def _start_ray(address: str | None) -> bool:
    """Connect to `address`, or start a local Ray when none runs yet; True when this call started one."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False)
    return True


def _pool_size(workers: int | None, gpus_per_worker: float) -> int:
    """Actors in the pool: `workers`, else one per GPU share or per CPU the cluster has."""
    import ray

    if workers is not None:
        return workers
    resources = ray.cluster_resources()
    if gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) / gpus_per_worker))
    return max(1, int(resources.get("CPU", 1)))


def _reused(out: Path, stats: dict[str, list[int]], runner: Runner, log: Callable[[str], None]) -> dict[str, list[Any]]:
    """Entries ([size, mtime, code hex, None]) of the rows of an existing `out` whose files are still scanned."""
    if not out.exists():
        log("nothing to resume: no earlier output found, encoding from the start")
        return {}
    earlier = read_codes(out)
    if earlier.fingerprint != runner.info.fingerprint or earlier.bits != runner.info.bits:
        raise EncodeError(f"{out}: was encoded by another model; rerun without --resume")
    kept = {
        rel: [*stats[rel], code.tobytes().hex(), None]
        for rel, code in zip(earlier.rows or (), earlier.packed) if rel in stats
    }  # fmt: skip
    log(f"resuming: {len(kept)} files already in {out.name}")
    return kept


def encode_ray(
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    runner: Runner,
    model_path: str | os.PathLike[str],
    backend: str = "auto",
    threads: int | None = 1,
    batch: int = 32,
    workers: int | None = None,
    gpus_per_worker: float = 0,
    address: str | None = None,
    resume: bool = False,
    strict: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda message: None,
    max_pixels: int = MAX_PIXELS,
) -> EncodeResult:
    """Encode every image under `images` (a folder, an image, or a `*.txt` list of paths or URIs)
    on Ray Data into `out`; see the module docstring.

    `runner` is the driver's own (its model info, and the manifest's model when no image reaches a
    worker); each worker runs `make_runner(model_path, backend, threads)`, on `gpus_per_worker`
    GPUs if set. Raises what `encode_folder` raises, in the same cases.
    """
    start = time.perf_counter()
    source, out_path = check_paths(images, out, batch)
    assert out_path is not None
    if gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker must be at least 0, got {gpus_per_worker}")
    import ray

    with output_lock(out_path):
        listed = is_list_file(source)
        if listed:
            root = Path(os.path.abspath(source)).parent
            # The workers open the listed files; the output keeps no size or mtime, so none is read here.
            stats, skipped = {entry: [0, 0] for entry in read_list(source, log)}, []
        else:
            root, found = scan_inputs(source, out_path)
            stats, found_skips = stat_files(root, found.files)
            skipped = [*found.skipped, *found_skips]
        entries = _reused(out_path, stats, runner, log) if resume else {}
        reused = len(entries)
        todo = [rel for rel in stats if rel not in entries]
        started = _start_ray(address)
        try:
            models = _run(ray, source, root, listed, todo, stats, entries, runner, str(model_path), backend, threads,
                          batch, _pool_size(workers, gpus_per_worker), gpus_per_worker, max_pixels, progress)  # fmt: skip
        finally:
            if started:
                ray.shutdown()
        lost = [rel for rel in todo if rel not in entries]
        if lost:
            raise EncodeError(f"{display_path(lost[0])}: {len(lost)} files came back from no worker; nothing written")
        if len(models) > 1:
            raise EncodeError(f"{out_path}: workers ran the model on different backends ({', '.join(sorted(models))}); pass --backend")
        model = json.loads(models.pop()) if models else model_record(runner)
        rows, packed, skipped = collect_rows(stats, entries, skipped, runner.info.nbytes, strict)
        write_codes(out_path, packed, runner.info.bits, rows, [s.as_dict() for s in skipped], model)
    return EncodeResult(out_path, rows, packed, skipped, len(todo), reused, time.perf_counter() - start, runner.describe())


def _run(
    ray: Any, source: Path, root: Path, listed: bool, todo: list[str], stats: dict[str, list[int]],
    entries: dict[str, list[Any]], runner: Runner, model_path: str, backend: str, threads: int | None,
    batch: int, pool: int, gpus: float, max_pixels: int, progress: Progress | None,
) -> set[str]:  # fmt: skip
    """Run the pipeline over `todo`, recording each file's entry; the workers' model records."""
    if progress:
        progress(len(entries), len(stats))
    if not todo:
        return set()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the CLI draws its own bar from `progress`
    context.print_on_execution_start = False
    blocks = min(max(1, -(-len(todo) // batch)), 4096)
    ds = ray.data.from_items([{"path": os.fsencode(rel)} for rel in todo], override_num_blocks=blocks)
    ds = ds.map_batches(
        _decode, batch_size=batch, batch_format="numpy", num_cpus=CPU_SHARE,
        fn_kwargs={"root": str(root), "size": runner.info.input_size, "max_pixels": max_pixels, "listed": listed},
    )  # fmt: skip
    ds = ds.map_batches(
        _Encoder, batch_size=batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pool),
        num_cpus=CPU_SHARE, num_gpus=gpus or None, max_restarts=-1, max_task_retries=TASK_RETRIES,
        fn_constructor_kwargs={"model_path": model_path, "backend": backend, "threads": threads},
    )  # fmt: skip
    models: set[str] = set()
    try:
        for part in ds.iter_batches(batch_format="numpy", batch_size=None):
            for path, code, reason in zip(part["path"], part["code"], part["reason"]):
                rel = os.fsdecode(path)
                entries[rel] = [*stats[rel], None, reason] if reason else [*stats[rel], code.tobytes().hex(), None]
            models.update(part["model"])
            if progress:
                progress(len(entries), len(stats))
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):  # a model that does not start on a worker: its one line
            raise cause from None
        if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)):
            # Ray already ran the batch again TASK_RETRIES times on restarted workers.
            raise EncodeError(
                f"{source}: a Ray worker died on one batch {TASK_RETRIES + 1} times, the last time with "
                f"{type(exc).__name__}; nothing written (see the Ray worker logs for why it died)"
            ) from None
        raise
    return models
