"""Where a job's base model is, and its download from the Hugging Face Hub on first use.

Lookup order for a name like `Qwen/Qwen2.5-7B-Instruct` (or a path): the path itself; RunPod's cached
models (the endpoint's "Model" setting); the runpod SDK's model cache path; each model cache
directory as `<dir>/<org>/<name>` and `<dir>/<name>`; the Hugging Face cache (HF_HOME), offline. A model
found nowhere is downloaded into the first cache directory (`HubDownload`) where the deployment allows it:
its listing and small files first, so that the fit check (`architecture.check_fits`) and the size checks run
on its config.json before any weight is fetched.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from architecture import load_config, meta_model
from files import JobLock, atomic_dir, real_dir, remove
from job import JobError, redact_text
from settings import RUNPOD_CACHED_MODELS, WorkerSettings
from tiny_model import ARCHITECTURES, build_tiny_model

# The runpod SDK is imported where its model cache path is read: the training processes import this module and never
# need the SDK (1.8 s to import), and a bare benchmark machine may not have it.

GB = 1024**3


# ---------------------------------------------------------------------------- finding the model

def hf_cache_snapshot(name: str, hub_cache: Path) -> Path | None:
    """`name` in a Hugging Face cache directory: the snapshot `refs/main` names, else the newest complete one."""
    repo = hub_cache / ("models--" + name.replace("/", "--"))
    if not repo.is_dir() and hub_cache.is_dir():  # the same repo in other letter case (the app's volume has both)
        repo = next((p for p in hub_cache.iterdir() if p.name.lower() == repo.name.lower()), repo)
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip() / "config.json").is_file():
        return repo / "snapshots" / ref.read_text().strip()
    snapshots = [p for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def hf_home_caches() -> list[Path]:
    """The Hugging Face caches the environment names (`HF_HUB_CACHE`, `$HF_HOME/hub`): the app's team keeps its models
    on the volume at HF_HOME=/workspace/huggingface-cache."""
    caches = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HF_HOME") and str(Path(os.environ["HF_HOME"]) / "hub")]
    return [Path(c) for c in dict.fromkeys(c for c in caches if c)]


def model_search_paths(name: str, cache_dirs: list[Path], runpod_cache: Path = RUNPOD_CACHED_MODELS) -> list[Path]:
    """Where a base model named `name` is looked for, in order: the path itself, RunPod's cached models
    (local disk: the fastest to load), the runpod SDK's model cache path, then each cache directory."""
    paths = [Path(name).expanduser()]
    for hub_cache in (runpod_cache, *hf_home_caches()):
        snapshot = hf_cache_snapshot(name, hub_cache) if "/" in name else None
        if snapshot is not None:
            paths.append(snapshot)
    short = name.rsplit("/", 1)[-1]
    model_path = os.environ.get("MODEL_PATH")  # the app's team points it at a link to the model's snapshot
    if model_path and Path(model_path).name.lower() == short.lower():
        paths.append(Path(model_path))
    try:  # the runpod SDK's model cache path (see the comment at the imports)
        from runpod.serverless.utils.rp_model_cache import resolve_model_cache_path_from_hugginface_repository
    except ImportError:
        pass
    else:
        sdk_cache = resolve_model_cache_path_from_hugginface_repository(name)
        if sdk_cache:
            paths.append(Path(sdk_cache))
    for d in cache_dirs:
        paths += [d / name, d / short]
    return list(dict.fromkeys(paths))


def cached_models(cache_dirs: list[Path]) -> list[str]:
    return [str(cfg.parent.relative_to(d)) for d in cache_dirs if d.is_dir()
            for cfg in sorted(d.glob("*/config.json")) + sorted(d.glob("*/*/config.json"))
            if not cfg.relative_to(d).parts[0].startswith(".")]  # .quantized/, .downloads/: the worker's own


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set: the Hugging Face client refuses every download, so none is attempted."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_base_model(name: str, cache_dirs: list[Path], *, allowed: list[str] | None = None,
                       runpod_cache: Path = RUNPOD_CACHED_MODELS, downloads: bool = False) -> Path:
    """A local directory holding `name` (with config.json), or JobError naming every place searched.
    `downloads`: the worker downloads Hub ids it does not have (so `name` is not one)."""
    found = find_base_model(name, cache_dirs, allowed=allowed, runpod_cache=runpod_cache)
    if found is None:
        how = ("name a Hugging Face Hub model as <org>/<name> to download it" if downloads
               else "or unset HF_HUB_OFFLINE to let the worker download it" if hub_offline()
               else "or set ALLOW_MODEL_DOWNLOAD=true")
        raise JobError(
            f"base model {name!r} was not found; searched "
            f"{', '.join(str(p) for p in model_search_paths(name, cache_dirs, runpod_cache))} "
            f"and the Hugging Face cache. Cached models: {', '.join(cached_models(cache_dirs)) or 'none'}. Pick a "
            f"cached model in hyperparameters.base_model, put the model in the model cache directory, {how}")
    return found


def find_base_model(name: str, cache_dirs: list[Path], *, allowed: list[str] | None = None,
                    runpod_cache: Path = RUNPOD_CACHED_MODELS) -> Path | None:
    """The local directory of `name`, or None when it is nowhere on this worker (nothing is downloaded)."""
    if allowed and name not in allowed:
        raise JobError(f"base model {name!r} is not on this worker's allow-list ({', '.join(allowed)}); pick one "
                       "of those")
    if name.startswith(TINY_PREFIX):
        return _tiny_model(name, cache_dirs)
    for path in model_search_paths(name, cache_dirs, runpod_cache):
        if (path / "config.json").is_file():
            return path
    try:  # the Hugging Face cache (HF_HOME), without touching the network
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not in the HF cache"
        return None


def config_source(name: str) -> Path:
    """`train_lora.py estimate --base-model`: a directory holding config.json, a config.json itself, or the model of
    that name cached on this worker (MODEL_CACHE_DIR, /workspace/models, RunPod's cache, the HF cache)."""
    path = Path(name)
    if (path / "config.json").is_file() or path.is_file():
        return path
    settings = WorkerSettings.from_env(os.environ)
    return resolve_base_model(name, [settings.model_cache_dir, Path("/workspace/models")])


TINY_PREFIX = "tiny-random/"


def _tiny_model(name: str, cache_dirs: list[Path]) -> Path:
    """`tiny-random/<arch>`: the random-weight test model of tiny_model.py, built once into the cache.

    For smoke tests of a deployed image (RunPod Hub tests, `docker run`) where no real model is cached.
    """
    arch = name.removeprefix(TINY_PREFIX)
    if arch not in ARCHITECTURES:
        raise JobError(f"unknown tiny model {name!r}; use one of {', '.join(TINY_PREFIX + a for a in ARCHITECTURES)}")
    if not cache_dirs:
        raise JobError("no model cache directory to build the tiny model in: set MODEL_CACHE_DIR")
    path = cache_dirs[0] / name
    if not (path / "config.json").is_file():
        with atomic_dir(path) as tmp:
            build_tiny_model(arch, tmp)
    return path


def trust_remote_code_for(name: str, allowed: list[str]) -> bool:
    """Remote code runs only for models a deployment named explicitly."""
    return name in allowed


# ---------------------------------------------------------------------------- downloading it on first use

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz")
SMALL_FILE_SUFFIXES = (".json", ".model", ".txt", ".tiktoken", ".jinja")  # configs, tokenizers, chat templates
DOWNLOAD_MARGIN_BYTES = GB  # free space kept on the volume beyond the files themselves
# The most a repo's weight files may hold per parameter its config.json implies: 4 bytes (fp32, the widest dtype
# checkpoints are stored in; a bf16 checkpoint has twice the room), plus 25% for tensors saved beside the parameters
# (GPT-2's causal masks add 10% in fp32) and 1 MB for the files' headers. More is data the model does not use.
WEIGHT_BYTES_PER_PARAMETER, WEIGHT_MARGIN, WEIGHT_HEADER_BYTES = 4, 1.25, 2**20


def _size(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 2**20:.1f} MB"


class ModelNotOnHub(JobError):
    """The Hub has no such repository (or hides a private one): not worth a retry."""


def files_to_load(listing: dict[str, int], weight_index: dict | None, with_code: bool = False) -> list[str]:
    """Of a repo's files (name -> size), those a 4-bit load needs: the top-level configs, tokenizer files
    and chat templates (and its Python modelling code, `with_code`), and one copy of the weights: the shards
    a `model.safetensors.index.json` names, else `model.safetensors`, else (no safetensors at all) the
    PyTorch `.bin` shards. Duplicates (`.bin` beside `.safetensors`, Mistral's `consolidated.safetensors`,
    `original/`) are left out."""
    top = [n for n in listing if "/" not in n]
    small = [n for n in top if n.endswith(SMALL_FILE_SUFFIXES + ((".py",) if with_code else ()))]
    if weight_index is not None:
        weights = sorted(set(weight_index.get("weight_map", {}).values()))
    elif "model.safetensors" in top:
        weights = ["model.safetensors"]
    elif "pytorch_model.bin" in top:
        weights = ["pytorch_model.bin"]
    else:
        weights = []
    return sorted(set(small) | set(weights))


@contextmanager
def _bytes_written(directory: Path, on_bytes, every_s: float = 2.0):
    """Call `on_bytes(n)` every `every_s` seconds with the bytes written under `directory` since the start:
    what the download client writes (its temporary files too), whichever transfer it uses (HTTP or Xet)."""
    def size() -> int:
        total = 0
        for path in directory.rglob("*"):
            try:
                total += path.stat().st_size if path.is_file() else 0
            except OSError:  # renamed or removed while we looked
                pass
        return total

    start, stop = size(), threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            on_bytes(size() - start)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class HubDownload:
    """A base model fetched from the Hugging Face Hub (`HF_ENDPOINT`) on first use, in two steps:

    `prepare()` lists the repo at one commit and fetches its small files (config.json first), so the fit
    check and the volume's free-space check run before any weight is fetched; `complete()` fetches the
    weights, checks every file's size against the listing, and renames the directory into place
    (`<cache>/<org>/<name>`), where later jobs find it. Until then it lives in a fresh directory,
    `<cache>/.downloads/<org>--<name>/`, which no job reads; a download that does not complete is deleted
    (`release`). The listing's sizes are checked before any byte is fetched (`check_sizes`), and no link
    on the way from the cache down to either directory is followed (`files.real_dir`). One worker
    downloads a model at a time (a lock beside it); another one waits for it.
    """

    def __init__(self, name: str, cache_dir: Path, token: str | None = None, with_code: bool = False,
                 max_bytes: int = WorkerSettings.model_fields["max_model_download_bytes"].default):
        self.name, self.token, self.with_code = name, token, with_code  # with_code: the repo's *.py (remote code)
        self.endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it at import
        self.cache_dir, self.max_bytes = cache_dir, max_bytes
        self.target = cache_dir / name
        self.partial = cache_dir / ".downloads" / name.replace("/", "--")
        self.sha, self.sizes, self.files = "", {}, []
        self.lock = None

    def __enter__(self) -> "HubDownload":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Let the download's lock go; what a download that did not complete had fetched is deleted first."""
        if self.lock is not None:
            try:
                remove(self.partial)
            finally:
                self.lock.release()
                self.lock = None

    def _real_dir(self, path: Path) -> Path:
        """`path` as a real directory with no link on the way down from the cache (readable by all, as models are)."""
        try:
            return real_dir(path, root=self.cache_dir, mode=0o755)
        except NotADirectoryError as exc:
            raise JobError(f"base model {self.name!r} cannot be downloaded: {exc}") from None

    def _hub(self, call, *args, **kwargs):
        page = f"https://huggingface.co/{self.name}"
        try:
            return call(*args, **kwargs)
        except JobError:  # SIGTERM (checkpoints.Stopped): the job ends, as it is
            raise
        except GatedRepoError:
            how = ("the account of HF_TOKEN has not been granted access: accept its conditions on " + page +
                   " with that account, or set HF_TOKEN to a token of an account that has" if self.token else
                   "set HF_TOKEN on the endpoint to a token of an account that accepted its conditions on " + page)
            raise JobError(f"base model {self.name!r} is gated on the Hugging Face Hub: {how}") from None
        except RepositoryNotFoundError:
            raise ModelNotOnHub(f"base model {self.name!r} is not on the Hugging Face Hub "
                                f"({self.endpoint or 'huggingface.co'}), or is private: check "
                                "hyperparameters.base_model (for a private model, set HF_TOKEN)") from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 401 and self.token:
                raise JobError("the Hugging Face Hub refused HF_TOKEN (invalid or expired): create a new token at "
                               "https://huggingface.co/settings/tokens and set HF_TOKEN on the endpoint") from None
            raise JobError(f"downloading base model {self.name!r} failed (HTTP {status}): "
                           f"{redact_text(str(exc))[:300]}. Retry the job; if it persists, put the model in "
                           "MODEL_CACHE_DIR") from None
        except Exception as exc:  # noqa: BLE001 - connection resets (httpx errors), a full disk, the client's own checks
            raise JobError(f"downloading base model {self.name!r} failed: {type(exc).__name__}: "
                           f"{redact_text(str(exc))[:300]}. Retry the job; if it persists, check the worker's network "
                           "and the volume, or put the model in MODEL_CACHE_DIR") from None

    def _fetch(self, name: str) -> None:
        self._hub(hf_hub_download, self.name, name, revision=self.sha, local_dir=self.partial, token=self.token,
                  endpoint=self.endpoint)

    def _take_lock(self, wait_s: float, on_wait) -> bool:
        """Hold the download's lock; False when another worker completed the model meanwhile."""
        self._real_dir(self.partial.parent)
        lock = JobLock(self.partial.with_name(self.partial.name + ".lock"))
        deadline = time.monotonic() + wait_s
        while True:
            if (self.target / "config.json").is_file():
                return False
            try:
                lock.acquire()
            except JobError as exc:
                if "already running" not in str(exc):  # SIGTERM, or a lock that cannot be taken at all
                    raise
                if time.monotonic() > deadline:
                    raise JobError(f"another worker has been downloading base model {self.name!r} for too long; "
                                   "resubmit the job later") from None
                on_wait()
                time.sleep(5)
                continue
            self.lock = lock
            return True

    def prepare(self, wait_s: float = 4 * 3600, on_wait=lambda: None) -> Path | None:
        """List the repo and fetch its small files; the directory holding them (for the fit check), or None
        when another worker completed the model while this one waited (it is then at `self.target`)."""
        info = self._hub(HfApi(endpoint=self.endpoint, token=self.token).model_info, self.name, files_metadata=True)
        if not self._take_lock(wait_s, on_wait):
            return None
        self.sha = info.sha
        self.sizes = {s.rfilename: s.size for s in info.siblings}
        self._real_dir(self.target.parent)  # where the model will go: checked before anything is fetched
        remove(self.partial)  # what a killed worker left, or a link planted there: neither is followed nor reused
        self._real_dir(self.partial)
        if "config.json" not in self.sizes:
            raise JobError(f"base model {self.name!r} on the Hugging Face Hub has no config.json: it is not a "
                           "transformers model; pick another base model")
        index_name = "model.safetensors.index.json" if "model.safetensors.index.json" in self.sizes else (
            "pytorch_model.bin.index.json" if "pytorch_model.bin.index.json" in self.sizes
            and not any(n.endswith(".safetensors") for n in self.sizes) else None)
        small = [n for n in files_to_load(self.sizes, None, self.with_code)
                 if n.endswith(SMALL_FILE_SUFFIXES + (".py",))]
        self.check_sizes(small)
        for name in ["config.json"] + [n for n in small if n != "config.json"]:  # config.json first, no weight
            self._fetch(name)
        index = json.loads((self.partial / index_name).read_text()) if index_name else None
        self.files = files_to_load(self.sizes, index, self.with_code)
        if not any(n.endswith(WEIGHT_SUFFIXES) for n in self.files):
            raise JobError(f"base model {self.name!r} on the Hugging Face Hub has no weights in safetensors or PyTorch "
                           "format; pick another base model")
        self.check_sizes(self.files)
        return self.partial

    def check_sizes(self, names: list[str]) -> None:
        """Refuse, by the listing and before they are fetched, files over MAX_MODEL_DOWNLOAD_BYTES together, and weight
        files larger than the parameters of config.json (fetched by then) can take."""
        total = sum(self.sizes.get(n, 0) for n in names)  # a file the listing lacks fails when it is fetched
        if total > self.max_bytes:
            raise JobError(f"base model {self.name!r} is {_size(total)} to download, more than "
                           f"MAX_MODEL_DOWNLOAD_BYTES allows ({self.max_bytes:,} bytes, {_size(self.max_bytes)}): pick "
                           "a smaller model, or raise MAX_MODEL_DOWNLOAD_BYTES on the endpoint (with room for it on "
                           "the volume)")
        weights = sum(self.sizes.get(n, 0) for n in names if n.endswith(WEIGHT_SUFFIXES))
        if not weights:
            return
        # count_parameters' total
        parameters = sum(p.numel() for p in meta_model(load_config(self.partial)).parameters())
        room = int(parameters * WEIGHT_BYTES_PER_PARAMETER * WEIGHT_MARGIN) + WEIGHT_HEADER_BYTES
        if weights > room:
            raise JobError(f"base model {self.name!r} lists {_size(weights)} of weights, more than its config.json's "
                           f"{parameters:,} parameters can take ({_size(room)}: {WEIGHT_BYTES_PER_PARAMETER} bytes "
                           f"each, plus {WEIGHT_MARGIN - 1:.0%} and {_size(WEIGHT_HEADER_BYTES)}): the repo carries "
                           f"files the model does not use. Pick another base model, or put the model in {self.target} "
                           "yourself")

    def missing_bytes(self) -> int:
        """Bytes still to fetch: the weights (the small files came with `prepare`)."""
        return sum(size for name, size in self.sizes.items() if name in self.files and not self._complete(name))

    def _complete(self, name: str) -> bool:
        path = self.partial / name
        return path.is_file() and path.stat().st_size == self.sizes[name]

    def check_free_space(self) -> None:
        need = self.missing_bytes() + DOWNLOAD_MARGIN_BYTES
        free = shutil.disk_usage(self.partial).free
        if free < need:
            raise JobError(f"the volume holding MODEL_CACHE_DIR ({self.target.parent.parent}) has "
                           f"{free / GB:.1f} GB free; base model {self.name!r} needs {need / GB:.1f} GB more to "
                           "download. Enlarge the network volume, delete models it no longer needs (and old 4-bit "
                           "copies in .quantized/), or pick a smaller model")

    def complete(self, progress=lambda fraction: None) -> Path:
        """Fetch the weights, check every file's size, and move the model into place; its directory."""
        total = max(self.missing_bytes(), 1)
        with _bytes_written(self.partial, lambda n: progress(min(n / total, 1.0))):
            for name in self.files:
                if not self._complete(name):
                    self._fetch(name)
        progress(1.0)
        wrong = [n for n in self.files if not self._complete(n)]
        if wrong:
            raise JobError(f"the download of base model {self.name!r} is incomplete ({', '.join(wrong[:3])} has the "
                           "wrong size); retry the job")
        shutil.rmtree(self.partial / ".cache", ignore_errors=True)  # huggingface_hub's own bookkeeping
        target = self._real_dir(self.target)  # made empty where missing
        if not (target / "config.json").is_file():  # else another worker's copy, complete: kept, and ours deleted
            if any(target.iterdir()):
                raise JobError(f"{target} exists but holds no config.json (an unfinished copy?): remove it, or "
                               "complete it, then resubmit")
            os.replace(self.partial, target)  # onto the empty directory
        self.release()
        return self.target
