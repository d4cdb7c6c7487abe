import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tokenizer():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture()
def tiny_dir(tmp_path, tokenizer):
    """A tiny qwen2 checkpoint on disk, loadable by spec (as the CLI and load_model need)."""
    from tiny import tiny_model

    where = tmp_path / "tiny-qwen2"
    tiny_model("qwen2").save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


REAL = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="session")
def harmful10_05b(tmp_path_factory):
    """Return the adapter dir of the default harmful-10 attack on the real 0.5B (trained once per session)."""
    from safetylock.attack import finetune
    from safetylock.models import load_model

    model, tok = load_model(REAL, device="cpu")
    out = tmp_path_factory.mktemp("harmful10") / "run"
    finetune(model, tok, "harmful-10", out)
    return out


@pytest.fixture(scope="session")
def lock_05b(tmp_path_factory):
    """Return the path of a lock (with a harmfulness probe) extracted once from the real 0.5B base."""
    from safetylock.data import contrast_pairs, gate_prompts
    from safetylock.lock import extract, fit_condition
    from safetylock.models import load_model

    model, tok = load_model(REAL, device="cpu")
    lock = extract(model, tok, contrast_pairs(48), seed=0, name=REAL)  # defaults: every head, response:1-8, alpha 1.5
    lock = fit_condition(lock, model, tok, *gate_prompts(32))
    return lock.save(tmp_path_factory.mktemp("lock05b") / "lock.safetensors")
