"""Model files for the recipes: a Hugging Face directory or a ``.gguf`` file, and the local cache.

Reading a GGUF file is slow: transformers parses it and dequantizes every tensor (~15 s for SmolLM2-135M on
2 CPU cores), and a recipe run reads it in every worker and in every later command (``daunce attribute``,
``add-queries``). :func:`local_copy` does it once: the dequantized float32 weights, the config (without
its GGUF quantization entry) and the tokenizer are saved as an ordinary Hugging Face directory under
:func:`cache_root`, keyed by the GGUF file's sha256, and read back in ~0.2 s. The copy is written to a
temporary folder and renamed into place, so a reader sees a whole copy or none.

The cache folder: ``$DAUNCE_CACHE_DIR``, else ``$XDG_CACHE_HOME/daunce-store``, else
``~/.cache/daunce-store``. It also holds the hidden-state caches of the cached LLM path
(``hidden-states/``). Everything in it is derived data, keyed by content: deleting it only costs time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from daunce_store.errors import InvalidInputError

__all__ = ["cache_root", "local_copy", "model_source"]


def cache_root() -> Path:
    """The folder of daunce-store's derived caches (model copies, hidden states)."""
    if os.environ.get("DAUNCE_CACHE_DIR"):
        return Path(os.environ["DAUNCE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "daunce-store"


def model_source(model: str) -> tuple[str, dict[str, Any]]:
    """(directory, extra from_pretrained kwargs) of ``--model``: a Hugging Face directory or a .gguf file."""
    p = Path(model)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return os.fspath(p.parent), {"gguf_file": p.name}
    if p.is_dir() and (p / "config.json").exists():
        return os.fspath(p), {}
    what = "does not exist" if not p.exists() else "is a directory without config.json" if p.is_dir() else "is not a .gguf file"
    raise InvalidInputError(
        f"--model {model!r} {what}; give a Hugging Face model directory (save_pretrained) or a .gguf file"
    )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _gguf_key(path: str, size: int, mtime_ns: int) -> str:
    return _file_sha256(Path(path))  # size and mtime only key the memo: a rewritten file is hashed again


def local_copy(model: str) -> str:
    """A Hugging Face directory holding ``model``: the directory itself, or for a .gguf file its dequantized
    copy under ``cache_root()/models/`` (made on first use)."""
    directory, kw = model_source(model)
    if "gguf_file" not in kw:
        return directory
    path = Path(model).resolve()
    st = path.stat()
    target = cache_root() / "models" / f"{path.stem}-{_gguf_key(os.fspath(path), st.st_size, st.st_mtime_ns)[:16]}"
    if (target / "model.safetensors").exists():
        return os.fspath(target)
    _write_copy(directory, kw, target)
    return os.fspath(target)


def _write_copy(directory: str, kw: dict[str, Any], target: Path) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kw)
        net = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"--model {os.path.join(directory, kw['gguf_file'])!r} is not a model transformers can read: "
                                f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        config = net.config.to_dict()
        config.pop("quantization_config", None)  # the weights are plain float32 now
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        save_model(net, os.fspath(tmp / "model.safetensors"))  # handles tied embeddings (SmolLM2's head)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # whole copy or none
        except OSError:  # another process made it first: theirs is the same
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
