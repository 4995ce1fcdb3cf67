"""A cache of GGUF checkpoints converted to float32 safetensors folders.

transformers parses a GGUF three times (config, tokenizer, weights) and dequantizes every tensor
on each load (~17 s for SmolLM2-135M on CPU). :func:`smoothrot.models.load_model` converts a local
GGUF once, stores the result here and loads the stored folder on later loads, like a local HF
folder (well under a second of I/O).

An entry is ``<root>/gguf/<key>/``: ``config.json`` (no quantization section),
``model.safetensors`` (float32, tied tensors once), ``generation_config.json``, the tokenizer
files, and ``complete.json`` (the key, the source path, every file's size), written last. The key
is the SHA-256 of the GGUF's bytes combined with :data:`CACHE_FORMAT` and the versions of
transformers and gguf (which dequantize), so an edited file or another converter gets a new
entry. Entries are written beside their final name and renamed into place
(:func:`smoothrot.io.atomic.atomic_folder`): a reader sees a complete entry or none.

The root is ``$SMOOTHROT_CACHE``, else ``$XDG_CACHE_HOME/smoothrot``, else
``~/.cache/smoothrot``; ``SMOOTHROT_CACHE=off`` (or empty) disables the cache. Nothing here
fails a load: a cache that cannot be written logs a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from smoothrot.io.atomic import TargetExistsError, atomic_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when an entry's layout or contents change
MARKER = "complete.json"
ENV = "SMOOTHROT_CACHE"
_OFF = {"", "off"}
_CHUNK = 1 << 20


def cache_root() -> Path | None:
    """The cache folder, or None when ``SMOOTHROT_CACHE`` is ``off`` or empty."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "smoothrot"


def converter_versions() -> dict[str, str]:
    """Versions of the packages that turn a GGUF into tensors: another one means another key."""
    import transformers

    try:
        gguf = version("gguf")
    except PackageNotFoundError:
        gguf = "none"
    return {"transformers": transformers.__version__, "gguf": gguf}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(path: str | Path, versions: dict[str, str] | None = None) -> str:
    """The entry name of a GGUF: its contents' SHA-256, the cache format and the converter
    versions (default :func:`converter_versions`) hashed together."""
    identity = {"format": CACHE_FORMAT, "sha256": file_sha256(path),
                **(converter_versions() if versions is None else versions)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def entry_path(key: str) -> Path | None:
    """Where the entry of ``key`` lives (whether or not it exists); None if disabled."""
    root = cache_root()
    return None if root is None else root / "gguf" / key


def _marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cached_folder(key: str) -> Path | None:
    """The complete entry of ``key`` (its marker names the key), or None."""
    folder = entry_path(key)
    if folder is None:
        return None
    marker = _marker(folder)
    return folder if marker is not None and marker.get("key") == key else None


def check_entry(folder: Path) -> None:
    """Raise ValueError if a file of the entry is missing or not the size it was written with."""
    marker = _marker(folder)
    files = marker.get("files") if marker else None
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise ValueError(f"{folder / MARKER} lists no files")
    for name, size in files.items():
        path = folder / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            raise ValueError(f"{name} has {actual} bytes, {size} written")


def load_entry(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False,
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Model (in ``dtype``), tokenizer and loading info of an entry, as from a local HF folder.
    Raises whatever a damaged entry makes transformers or :func:`check_entry` raise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smoothrot.io.loader import quiet_transformers

    check_entry(folder)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, use_safetensors=True, output_loading_info=True,
            ignore_mismatched_sizes=True, **kwargs)
    return model, tokenizer, info


def discard(folder: Path) -> None:
    """Remove an entry (damaged); a failure to remove it is logged, not raised."""
    try:
        shutil.rmtree(folder)
    except OSError as exc:
        log.warning("could not remove the damaged GGUF cache entry %s: %s", folder, exc)


def store(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, key: str,
          source: str | Path) -> Path | None:
    """Write the entry of ``key`` from a model loaded (float32) from the GGUF ``source``.

    Returns the entry, or None (after a warning) if the cache is disabled or cannot be written:
    the load goes on without it. An entry another process finished first is kept.
    """
    from smoothrot.models import save_float_checkpoint

    final = entry_path(key)
    if final is None:
        return None
    if cached_folder(key) is not None:
        return final
    try:
        if final.exists():  # no marker: written by hand, or a damaged entry not removed
            shutil.rmtree(final)
        with atomic_folder(final) as tmp:
            save_float_checkpoint(model, tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(str(tmp))
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            marker = {"format": CACHE_FORMAT, "key": key, "source": str(source),
                      "source_bytes": Path(source).stat().st_size,
                      "versions": converter_versions(), "files": files}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    except TargetExistsError:  # another process stored it meanwhile
        return final
    except Exception as exc:  # a read-only or full disk must not fail the load
        log.warning("could not write the GGUF cache entry %s (%s: %s); the load goes on, and "
                    "the next one converts the GGUF again (set %s to a writable folder, or to "
                    "'off')", final, type(exc).__name__, str(exc).splitlines()[0] if str(exc)
                    else "", ENV)
        return None
    log.info("converted GGUF cached at %s (%.0f MB)", final, sum(files.values()) / 1e6)
    return final
