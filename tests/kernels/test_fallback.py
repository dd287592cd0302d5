"""The package works without the extension, and the fallback gives the extension's answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from daunce_store._constants import NO_EXT_ENV
from daunce_store.scoring._backend import available_backends

SCRIPT = """
import json, sys
{prelude}
import numpy as np
from daunce_store.scoring import topk
from daunce_store.scoring._backend import available_backends
rng = np.random.default_rng(0)
x = rng.standard_normal((3000, 12)).astype(np.float32)
x[::7] = x[3]  # ties
q = rng.standard_normal((4, 12)).astype(np.float32)
out = topk(((o, x[o:o + 500]) for o in range(0, 3000, 500)), q, 25, "corr")
print(json.dumps({{"backends": available_backends(), "kernel_loaded": sys.modules.get("daunce_store._kernel") is not None,
                  "pos": out["pos"][0].tolist(), "neg": out["neg"][0].tolist(), "pos_scores": out["pos"][1].tolist()}}))
"""


def _run(env_extra: dict[str, str], prelude: str = "") -> dict:
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(prelude=prelude)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_auto_uses_the_extension_when_built():
    if os.environ.get(NO_EXT_ENV):
        pytest.skip(f"{NO_EXT_ENV} is set")
    assert available_backends()[0] == "rust"


@pytest.mark.parametrize(
    ("env", "prelude"),
    [({NO_EXT_ENV: "1"}, ""), ({NO_EXT_ENV: ""}, "sys.modules['daunce_store._kernel'] = None  # as if never built")],
    ids=["env-var", "extension-missing"],
)
def test_fallback_agrees_with_the_extension(env, prelude):
    fallback = _run(env, prelude)
    assert "rust" not in fallback["backends"]
    assert fallback["backends"][0] == "numba"
    assert not fallback["kernel_loaded"]
    here = _run({NO_EXT_ENV: ""})
    assert fallback["pos"] == here["pos"] and fallback["neg"] == here["neg"]
    np.testing.assert_allclose(fallback["pos_scores"], here["pos_scores"], rtol=1e-5, atol=1e-6)
    if not os.environ.get(NO_EXT_ENV):
        assert here["backends"][0] == "rust"
