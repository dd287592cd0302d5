"""The scoring vocabularies (kernel measures, sides, backends), each written once as a Literal type; the tuple of its values
is derived from it, so a signature, a check and a CLI choice cannot drift apart."""

from __future__ import annotations

from typing import Literal, get_args

from daunce_store.errors import InvalidInputError

__all__ = ["KernelMeasure", "KERNEL_MEASURES", "Side", "SIDES", "SideChoice", "SIDE_CHOICES", "side_choice", "Backend", "BACKENDS", "BackendChoice", "BACKEND_CHOICES"]

KernelMeasure = Literal["cov", "corr"]  # row preparations the kernels know; score measures: _measures.py
KERNEL_MEASURES: tuple[KernelMeasure, ...] = get_args(KernelMeasure)
Side = Literal["pos", "neg"]  # one ranked list: proponents, opponents
SIDES: tuple[Side, ...] = get_args(Side)
SideChoice = Literal[Side, "both"]  # what a caller asks for: one list or both
SIDE_CHOICES: tuple[SideChoice, ...] = get_args(SideChoice)
Backend = Literal["rust", "numba", "numpy", "torch"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
BackendChoice = Literal["auto", Backend]  # auto picks one of BACKENDS (never torch)
BACKEND_CHOICES: tuple[BackendChoice, ...] = get_args(BackendChoice)


def side_choice(value: str) -> SideChoice:
    """``value`` (text from a request) as a side, or InvalidInputError naming the choices."""
    for choice in SIDE_CHOICES:
        if value == choice:
            return choice
    raise InvalidInputError(f"side must be pos, neg or both, not {value!r}")
