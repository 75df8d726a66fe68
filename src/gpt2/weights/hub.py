"""Download GPT-2's weights, check them, and keep them in a local cache.

The cache lives in `$GPT2_HOME`, or `~/.cache/gpt2` when that is unset:

    <cache>/124M/       OpenAI's seven files (from OpenAI's release or the Kaggle mirror)
    <cache>/124M-hf/    the Hugging Face layout (config.json, model.safetensors, ...)

A download is written into a hidden `<cache>/.<name>.partial/` folder and
renamed to its final name only once every file is complete and verified, so a
folder under its final name is always a whole model. Files inside the partial
folder are kept between runs: running the same command again resumes them.

    >>> path = download("124M")          # doctest: +SKIP
    >>> resolve_model("gpt2")            # doctest: +SKIP
    PosixPath('/home/me/.cache/gpt2/124M')
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gpt2._io import exclusive, fsync_dir, refuse_the_folder_you_are_in
from gpt2.config import ALIASES, PRESETS, GPT2Config, check_size, resolve_size
from gpt2.errors import GPT2Error

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
# The files a loader cannot do without; `checkpoint` and `model.ckpt.meta` are TF bookkeeping.
OPENAI_NEEDED = ("encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                 "model.ckpt.index", "vocab.bpe")
# Every size shares one vocabulary; these are the hashes of OpenAI's files.
SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

HF_REPOS = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
HF_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json")
HF_NEEDED = ("config.json", "model.safetensors", "vocab.json", "merges.txt")

# The Kaggle dataset "OpenAI GPT-2 Weights": one folder per size with OpenAI's seven files.
KAGGLE_HANDLE = "xhlulu/openai-gpt2-weights"

SOURCES = ("openai", "hf", "kaggle")
# (the package's "download" extra holds both; a bare `pip install 'gpt2[download]'` would
# fetch PyPI's unrelated project of that name)
_INSTALL_HINT = "pip install {}, or `pip install -e '.[download]'` in gpt2's checkout"
_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


# --- the cache -------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where downloaded models live: `$GPT2_HOME`, else `~/.cache/gpt2`."""
    home = os.environ.get("GPT2_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "gpt2"


def cached_model_dir(size: str, *, source: str | None = None) -> Path | None:
    """The cache folder of a size if it holds a complete model, else None.

    Looks for OpenAI's layout first, then the Hugging Face one; `source`
    ("openai", "hf" or "kaggle") restricts the search to one layout.

    >>> cached_model_dir("gpt2")         # doctest: +SKIP
    PosixPath('/home/me/.cache/gpt2/124M')
    """
    key = _canonical_size(size)
    sources = ("openai", "hf") if source is None else (_check_source(source),)
    for src in sources:
        folder = cache_dir() / _folder_name(key, src)
        if _is_complete(folder, src):
            return folder
    return None


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A model folder or file from what a user typed after `--model`.

    An existing path is returned as it is; a size name (124M, gpt2-medium, ...)
    becomes its cache folder; a size that is not downloaded raises GPT2Error
    naming the command that fetches it.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    key = resolve_size(str(name_or_path))
    if key is None:
        raise GPT2Error(
            f"model {str(name_or_path)!r} is neither an existing file or folder nor a GPT-2 size; "
            f"give a path or one of {', '.join(PRESETS)} (or {', '.join(ALIASES)})"
        )
    found = cached_model_dir(key)
    if found is None:
        raise GPT2Error(
            f"model {key} is not downloaded (looked in {cache_dir()}); fetch it with "
            f"`gpt2 download {key}` (or give the path of a folder that holds it)"
        )
    return found


# --- downloading -----------------------------------------------------------------------------


def download(
    size: str,
    *,
    source: str = "openai",
    dest: str | os.PathLike | None = None,
    kaggle_handle: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Fetch a size, verify it, and return the folder it now lives in.

    `dest` puts the size folder under that folder instead of the cache; `force`
    fetches again even when a complete copy is already there.

    >>> download("124M", source="hf")    # doctest: +SKIP
    PosixPath('/home/me/.cache/gpt2/124M-hf')
    """
    key = _canonical_size(size)
    source = _check_source(source)
    root = Path(dest).expanduser() if dest is not None else cache_dir()
    final = root / _folder_name(key, source)
    if force:  # (it would be replaced)
        refuse_the_folder_you_are_in(Path(os.path.realpath(final)), final)
    if not force and _is_complete(final, source):
        _say(f"{key} is already downloaded in {final} (use --force to fetch it again)")
        return final
    partial = root / f".{final.name}.partial"
    where = "choose another --dir" if dest is not None else \
        "give --dir, or set GPT2_HOME to a folder you can write"  # (the cache is the problem)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GPT2Error(f"cannot create {root}: {e.strerror}; {where}") from None
    # two downloads of one size into one folder would write the same .part files
    with exclusive(root / f".{final.name}.lock", f"another `gpt2 download` of {key} into "
                   f"{root} is running; wait for it to end", where=str(root)):
        # (a folder that cannot be written fails here: "ROOT: cannot write here (...)")
        if not force and _is_complete(final, source):  # (that other one just finished it)
            _say(f"{key} is already downloaded in {final}")
            return final
        return _download_into(partial, final, key, source, kaggle_handle=kaggle_handle,
                              force=force, progress=progress)


def _download_into(partial: Path, final: Path, key: str, source: str, *,
                   kaggle_handle: str | None, force: bool, progress: bool) -> Path:
    """Fetch into `partial` (resuming what an earlier try left there), verify, then
    move it to `final`."""
    if force and partial.exists():
        shutil.rmtree(partial)
    try:
        partial.mkdir(exist_ok=True)
    except OSError as e:
        raise GPT2Error(f"cannot create {partial}: {e.strerror}; choose another --dir") from None

    try:
        if source == "hf":
            _fetch_hf(key, partial, force=force)
            _verify_hf_folder(partial, key)
        else:
            if source == "openai":
                _fetch_openai(key, partial, progress=progress)
            else:
                _fetch_kaggle(key, partial, handle=kaggle_handle, force=force)
            _verify_openai_folder(partial, key)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.rmdir()  # if empty: nothing fetched to resume from, nothing to leave
        raise
    _place(partial, final)
    return final


def _fetch_openai(size: str, folder: Path, *, progress: bool) -> None:
    base = os.environ.get("GPT2_OPENAI_BASE_URL", OPENAI_BASE_URL).rstrip("/")
    for name in OPENAI_FILES:
        target = folder / name
        if target.exists():  # finished (and checked) on an earlier run
            continue
        fetch_url(f"{base}/{size}/{name}", target, sha256=SHA256.get(name), progress=progress)


def fetch_url(url: str, target: Path, *, sha256: str | None = None, progress: bool = True) -> None:
    """Stream `url` into `target` by way of `target.part`, resuming a `.part` left before.

    The `.part` file becomes `target` only when its size matches what the
    server announced and, when given, its sha256 matches too.
    """
    part = target.with_name(target.name + ".part")
    for _ in range(2):  # the second try starts from zero when a resume cannot be used
        have = part.stat().st_size if part.exists() else 0
        with _open_url(url, start=have) as response:
            plan = _plan(response, have)
            if plan is None:  # a reply for a range we did not ask for
                part.unlink(missing_ok=True)
                continue
            keep, total = plan
            _stream(response, part, url, keep=keep, total=total, progress=progress)
            break
    else:
        raise GPT2Error(f"{url}: the server answers with the wrong byte ranges; try again later")

    size = part.stat().st_size
    if total is not None and size != total:
        raise GPT2Error(f"{url}: got {size:,} of {total:,} bytes; run the command again to resume")
    if sha256 is not None:
        digest = _sha256(part)
        if digest != sha256:
            part.unlink()
            raise GPT2Error(
                f"{url}: sha256 is {digest}, expected {sha256}; the file is corrupt or not "
                f"OpenAI's, so it was deleted; run the command again"
            )
    os.replace(part, target)


def _open_url(url: str, *, start: int):
    """urlopen asking for the bytes from `start` on; network failures become GPT2Error."""
    headers = {"User-Agent": "gpt2-from-scratch"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S
        )
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:
            # The part is as long as the file or longer: ask for all of it instead.
            return _open_url(url, start=0)
        raise GPT2Error(
            f"could not download {url}: HTTP {e.code} {e.reason}; check the size name and "
            f"the address (GPT2_OPENAI_BASE_URL), or try --source hf"
        ) from None
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        raise GPT2Error(
            f"could not reach {url} ({_reason(e)}); check your internet connection or proxy, "
            f"then run the command again (finished files are kept)"
        ) from None


def _plan(response, have: int) -> tuple[int, int | None] | None:
    """(bytes of the part to keep, full file size) for this reply; None if it is unusable.

    A 200 is the whole file (servers that ignore Range send one), so nothing is
    kept; a 206 must start exactly where the part ends.
    """
    if response.status != 206:
        return 0, _content_length(response)
    # Content-Range: "bytes 1000-4999/5000"
    unit, _, rest = response.headers.get("Content-Range", "").partition(" ")
    span, _, total = rest.partition("/")
    try:
        start = int(span.split("-")[0])
    except ValueError:
        return None
    if unit != "bytes" or start != have:
        return None
    return have, int(total) if total.isdigit() else None


def _content_length(response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


def _stream(response, part: Path, url: str, *, keep: int, total: int | None,
            progress: bool) -> None:
    """Write the reply's body after the first `keep` bytes of `part`."""
    bar = _Progress(part.name.removesuffix(".part"), total, keep) if progress else None
    try:
        with open(part, "ab" if keep else "wb") as f:
            while chunk := _read(response, url, part):
                try:
                    f.write(chunk)
                except OSError as e:
                    raise GPT2Error(
                        f"cannot write {part}: {e.strerror}; free some disk space (or choose "
                        f"another --dir) and run the command again to resume"
                    ) from None
                if bar:
                    bar.update(len(chunk))
    finally:
        if bar:
            bar.close()


def _read(response, url: str, part: Path) -> bytes:
    try:
        return response.read(_CHUNK)
    except (OSError, http.client.HTTPException) as e:
        raise GPT2Error(
            f"{url}: the connection broke ({_reason(e)}) after {part.stat().st_size:,} bytes; "
            f"run the command again to resume"
        ) from None


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    if isinstance(reason, http.client.IncompleteRead):
        return "the server closed the connection early"
    return str(getattr(reason, "strerror", None) or reason) or type(reason).__name__


def _fetch_hf(size: str, folder: Path, *, force: bool) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise GPT2Error(
            f"--source hf needs huggingface_hub, which is not installed: "
            f"{_INSTALL_HINT.format('huggingface_hub')} "
            f"(or use --source openai, which needs nothing extra)"
        ) from None
    repo = HF_REPOS[size]
    _say(f"fetching {repo} from the Hugging Face hub")
    try:
        snapshot_download(repo, local_dir=folder, allow_patterns=list(HF_FILES),
                          force_download=force)
    except Exception as e:  # network, auth and hub errors all end the same way for a user
        raise GPT2Error(
            f"could not download {repo} from the Hugging Face hub ({type(e).__name__}: "
            f"{_first_line(e)}); check your connection (or HF_ENDPOINT), then run again"
        ) from None


def _fetch_kaggle(size: str, folder: Path, *, handle: str | None, force: bool) -> None:
    handle = handle or os.environ.get("GPT2_KAGGLE_HANDLE") or KAGGLE_HANDLE
    try:
        import kagglehub
    except ImportError:
        raise GPT2Error(
            f"--source kaggle needs kagglehub, which is not installed: "
            f"{_INSTALL_HINT.format('kagglehub')} "
            f"(or use --source openai, which needs nothing extra)"
        ) from None
    if not _kaggle_credentials_present():
        raise GPT2Error(
            "no Kaggle credentials: create an API token at https://www.kaggle.com/settings and "
            "save it as ~/.kaggle/kaggle.json (or set KAGGLE_USERNAME and KAGGLE_KEY), "
            "or use --source openai"
        )
    _say(f"fetching {size} from the Kaggle dataset {handle}")
    try:
        got = Path(kagglehub.dataset_download(handle, path=size, force_download=force))
    except Exception as e:  # kagglehub raises requests', its own and ValueError alike
        raise GPT2Error(
            f"could not download {size} from the Kaggle dataset {handle} ({type(e).__name__}: "
            f"{_first_line(e)}); check the handle (--kaggle-handle) and your connection"
        ) from None
    source = _find_openai_folder(got)
    if source is None:
        raise GPT2Error(
            f"the Kaggle dataset {handle} has no folder {size} with hparams.json (got {got}); "
            f"give the right dataset with --kaggle-handle"
        )
    for name in OPENAI_FILES:
        src, dst = source / name, folder / name
        if not src.is_file():
            continue  # a missing needed file is reported by the verification that follows
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()
        try:
            os.link(src, dst)  # same disk: no second copy of a multi-gigabyte file
        except OSError:
            shutil.copyfile(src, dst)


def _find_openai_folder(path: Path) -> Path | None:
    if (path / "hparams.json").is_file():
        return path
    if path.is_dir():
        for hparams in sorted(path.rglob("hparams.json")):
            return hparams.parent
    return None


def _kaggle_credentials_present() -> bool:
    """The credentials kagglehub reads: an API token, the two variables, or kaggle.json."""
    env = os.environ
    if env.get("KAGGLE_API_TOKEN") or (env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY")):
        return True
    config = Path(env.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
    names = ("kaggle.json", "access_token", "access_token.txt")
    return any((config / n).is_file() for n in names)


# --- verification and placement --------------------------------------------------------------


def _verify_openai_folder(folder: Path, size: str) -> None:
    missing = [n for n in OPENAI_NEEDED if not (folder / n).is_file()]
    if missing:
        raise GPT2Error(f"{folder}: missing {', '.join(missing)}; run the command again")
    for name, expected in SHA256.items():
        digest = _sha256(folder / name)
        if digest != expected:
            (folder / name).unlink()
            raise GPT2Error(
                f"{folder / name}: sha256 is {digest}, expected {expected}; the file was "
                f"deleted, run the command again"
            )
    check_size(GPT2Config.from_hparams(folder / "hparams.json"), size, folder / "hparams.json")
    _verify_tf_checksums(folder)


def _verify_tf_checksums(folder: Path) -> None:
    """Read every tensor once so its crc32c is checked, when the checkpoint reader exists."""
    try:
        from gpt2.weights.tf_checkpoint import TFCheckpoint
    except ImportError:
        return
    _say("checking the checkpoint's crc32c sums")
    ckpt = TFCheckpoint(str(folder / "model.ckpt"))
    for name in ckpt.names():
        ckpt.read(name)  # raises GPT2Error naming the tensor on a mismatch


def _verify_hf_folder(folder: Path, size: str) -> None:
    """The files are there, config.json is `size`'s shape, model.safetensors is whole
    (its header parses and the file holds every tensor it lists, wte shaped as the
    config says) and, where the hub gave its sha256 (the ETag of a large file, which
    huggingface_hub records beside a download), has that sha256."""
    from gpt2.weights.huggingface import safetensors_header

    missing = [n for n in HF_NEEDED if not (folder / n).is_file()]
    if missing:
        raise GPT2Error(f"{folder}: missing {', '.join(missing)} after the download; run again")
    config = GPT2Config.from_hf_config(folder / "config.json")
    check_size(config, size, folder / "config.json")
    weights = folder / "model.safetensors"
    expected = _hub_sha256(folder, weights.name)
    if expected is not None:
        _say(f"checking {weights.name}'s sha256")
        digest = _sha256(weights)
        if digest != expected:
            weights.unlink()
            raise GPT2Error(f"{weights}: sha256 is {digest}, the hub lists {expected}; the file "
                            "was deleted, run the command again")
    try:
        header = safetensors_header(weights)
        wte = header.get("transformer.wte.weight", header.get("wte.weight"))
        if wte is None or wte[1] != (config.n_vocab, config.n_embd):
            got = "no wte.weight" if wte is None else f"wte.weight of shape {list(wte[1])}"
            raise GPT2Error(f"{weights}: holds {got}, but config.json says "
                            f"[{config.n_vocab}, {config.n_embd}]")
    except GPT2Error as e:
        # huggingface_hub would trust the file on a rerun (its commit matches): remove it
        weights.unlink()
        raise GPT2Error(f"{str(e).split('; ')[0]}; the file was deleted, run the command "
                        "again") from None


def _hub_sha256(folder: Path, name: str) -> str | None:
    """The sha256 the hub gave for a file huggingface_hub downloaded into `folder`: its
    ETag, recorded in .cache/huggingface/download/NAME.metadata (lines: commit, ETag,
    time). A large (LFS) file's ETag is its sha256; a small file's is not (None)."""
    metadata = folder / ".cache" / "huggingface" / "download" / f"{name}.metadata"
    try:
        lines = metadata.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    etag = lines[1].strip().strip('"').lower() if len(lines) > 1 else ""
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


def _place(partial: Path, final: Path) -> None:
    """Rename the finished partial folder to its final name (replacing an old copy)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(partial, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _is_complete(folder: Path, source: str) -> bool:
    needed = HF_NEEDED if source == "hf" else OPENAI_NEEDED
    return folder.is_dir() and all((folder / n).is_file() for n in needed)


def _folder_name(size: str, source: str) -> str:
    return f"{size}-hf" if source == "hf" else size


def _canonical_size(size: str) -> str:
    key = resolve_size(size)
    if key is None:
        raise GPT2Error(
            f"unknown GPT-2 size {size!r}; choose one of {', '.join(PRESETS)} "
            f"(or {', '.join(ALIASES)})"
        )
    return key


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise GPT2Error(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    return source


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"


def _say(message: str) -> None:
    print(message, file=sys.stderr)


# --- progress ---------------------------------------------------------------------------------


class _Progress:
    """tqdm when it is installed, else one stderr line rewritten at most twice a second."""

    def __init__(self, name: str, total: int | None, done: int) -> None:
        self.name, self.total, self.done, self.shown = name, total, done, 0.0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, initial=done, desc=name, unit="B", unit_scale=True,
                            unit_divisor=1024, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.shown > 0.5:
            self.shown = time.monotonic()
            self._line(end="")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(end="\n")

    def _line(self, end: str) -> None:
        total = f" / {self.total / 1e6:,.1f}" if self.total else ""
        print(f"\r{self.name}: {self.done / 1e6:,.1f}{total} MB", end=end, file=sys.stderr,
              flush=True)
