"""Docstring examples (``--doctest-modules`` over jax_impl, torch_impl and parity) run with the
imports every example would start with, in a temporary directory (some write files)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_setup(request, doctest_namespace, tmp_path, monkeypatch):
    if isinstance(request.node, DoctestItem):
        doctest_namespace.update(jax=jax, jnp=jnp, np=np, optax=optax, torch=torch)
        monkeypatch.chdir(tmp_path)
        torch.manual_seed(0)
