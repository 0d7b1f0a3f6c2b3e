"""The tokenized-data cache of `moetune.data` and the helpers that run around tokenizing.

An entry is `<HF datasets cache>/moetune/<key>/` with the kept rows (`data/`, `Dataset.save_to_disk`, read back
memory-mapped) and the split's report (`report.json`). The key hashes the source's identity (a local file's
path, size and mtime; a Hub dataset's fingerprint), the tokenizer (name + vocab, special tokens and chat template),
the data settings that change the tokens, the row limit, the tokenizers/transformers/trl versions and
`CACHE_VERSION`. Reading an entry marks it used; after each write the least recently used entries go until the
cache holds at most `MOETUNE_DATA_CACHE_GB` (default 10) gigabytes. Deleting the folder is always safe.
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path


logger = logging.getLogger("moetune.data")
CACHE_VERSION = "1"  # bump when tokenizing changes what a cached dataset holds
DEFAULT_LIMIT_GB = 10.0


def cache_root() -> Path:
    """Where tokenized datasets are cached: `moetune/` under the Hugging Face datasets cache (HF_DATASETS_CACHE)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "moetune"


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    for part in (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), vocab,
                 json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
                 str(getattr(tokenizer, "chat_template", None))):
        digest.update(str(part).encode())
        digest.update(b"\0")
    return f"{getattr(tokenizer, 'name_or_path', '')}:{digest.hexdigest()[:24]}"


def library_versions() -> dict[str, str]:
    """Versions whose change may change the tokens: the tokenizer libraries and TRL's training chat templates."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("tokenizers", "transformers", "trl"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = ""
    return found


def cache_key(base: dict, limit: int | None) -> str:
    return hashlib.sha256(json.dumps({**base, "max_rows": limit}, sort_keys=True).encode()).hexdigest()[:32]


def read_cache(key: str):
    """(dataset, stored report fields) of an entry, or None."""
    import datasets

    folder = cache_root() / key
    try:
        stored = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        dataset = datasets.Dataset.load_from_disk(str(folder / "data"))
    except (OSError, ValueError):
        return None
    _mark_used(folder)
    return dataset, stored


def write_cache(key: str, dataset, report: dict) -> None:
    """Written to a temporary folder, then renamed: a reader never sees half a cache entry."""
    folder = cache_root() / key
    tmp = folder.with_name(f"{key}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with progress_bars(False):
            dataset.save_to_disk(str(tmp / "data"))
        (tmp / "report.json").write_text(json.dumps(report), encoding="utf-8")
        os.replace(tmp, folder)
    except OSError as err:  # a full disk or another process that won the race: the run goes on uncached
        logger.debug("could not cache the tokenized data in %s: %s", folder, err)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    _mark_used(folder)
    evict(keep=folder)


def _mark_used(folder: Path) -> None:
    try:
        os.utime(folder / "report.json")  # the entry's last use: what eviction orders by
    except OSError:
        pass


def cache_limit_bytes() -> int:
    text = os.environ.get("MOETUNE_DATA_CACHE_GB", "")
    try:
        limit = float(text) if text.strip() else DEFAULT_LIMIT_GB
    except ValueError:
        logger.warning("MOETUNE_DATA_CACHE_GB=%r is not a number; using %s", text, DEFAULT_LIMIT_GB)
        limit = DEFAULT_LIMIT_GB
    return int(max(limit, 0.0) * 1024**3)


def _entry_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def evict(*, keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Delete least recently used entries until the cache fits `limit` bytes; `keep` (the entry just written)
    stays even when it alone is larger. Returns the deleted folders. Never raises: eviction is housekeeping."""
    limit = cache_limit_bytes() if limit is None else limit
    try:
        entries = []
        for folder in cache_root().iterdir():
            report = folder / "report.json"
            if folder.is_dir() and report.is_file():  # `*.tmp-PID` folders are writes in progress: left alone
                entries.append((report.stat().st_mtime, folder, _entry_size(folder)))
    except OSError:
        return []
    total = sum(size for _, _, size in entries)
    deleted = []
    for _, folder, size in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and folder == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        deleted.append(folder)
    if deleted:
        logger.info("data cache over %.1f GB: removed %d least recently used entr%s", limit / 1024**3,
                    len(deleted), "y" if len(deleted) == 1 else "ies")
    return deleted


@contextlib.contextmanager
def main_process_first():
    """Under several processes the main one tokenizes (and caches) first; the others then read its cache."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


@contextlib.contextmanager
def progress_bars(show: bool):
    """datasets' progress bars off inside the block unless `show` (and not switched off globally already)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if was_enabled and not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled and not show:
            datasets.enable_progress_bars()
