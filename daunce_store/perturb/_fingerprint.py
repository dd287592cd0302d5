"""A model's fingerprint (sha256 of its weights): the runner records θ0's with each column (``model_sha256``)
and keys its θ0 check to it; the cached fast path keys its hidden states to the trunk's."""

from __future__ import annotations

import hashlib
import weakref

import torch

__all__ = ["model_fingerprint"]

_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, shapes, dtypes, values); cached per model."""
    if model not in _FINGERPRINTS:
        h = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        _FINGERPRINTS[model] = h.hexdigest()
    return _FINGERPRINTS[model]
