"""Test-session setup. Runs before jax is imported anywhere in the session."""
import os
import pathlib

# 8 simulated CPU devices so sharding code paths run on this machine; must precede `import jax`.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
if (SHARED / "nltk_data").is_dir():
    os.environ.setdefault("NLTK_DATA", str(SHARED / "nltk_data"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared (specs, fixtures); tests that need it skip in a user's clone that lacks it."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (only CI and the dev machine have the reference fixtures)")
    return SHARED
