import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on CI; hub code paths are tested on local files
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MKL's reproducible mode (same code path, results independent of memory alignment): the export tests compare
# logits across processes at 1e-4, and without it a 30-layer model now and then differed by ~5e-3 between runs.
os.environ.setdefault("MKL_CBWR", "AUTO")

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "assets" / "data"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Every test gets its own cache, data folder and database."""
    monkeypatch.setenv("TSDPO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TSDPO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("TSDPO_DB", raising=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def _tiny_lm_and_snapshot(tiny_model_dir):
    from engine.models import load_model

    lm = load_model(tiny_model_dir)
    return lm, _snapshot(lm)


def _snapshot(lm) -> dict:
    hooks = {name: (set(m._forward_hooks), set(m._forward_pre_hooks)) for name, m in lm.model.named_modules()}
    return {"params": {n: p.detach().clone() for n, p in lm.model.named_parameters()}, "hooks": hooks,
            "attn": lm.model.config._attn_implementation}


@pytest.fixture
def tiny_lm(_tiny_lm_and_snapshot):
    """The session's tiny model, put back as it was after each test: weights bit for bit, no hook a test
    left on a block, the attention implementation it loaded with, no mixer still registered."""
    import torch

    lm, snap = _tiny_lm_and_snapshot
    yield lm
    for m in list(lm.mixers):
        m.clear()
    lm.mixers.clear()
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if not torch.equal(p, snap["params"][n]):
                p.copy_(snap["params"][n])
    for name, m in lm.model.named_modules():  # hooks a test left (transformers adds its own lazily: those stay)
        fwd, pre = snap["hooks"].get(name, (set(), set()))
        for hooks, had in ((m._forward_hooks, fwd), (m._forward_pre_hooks, pre)):
            for k in set(hooks) - had:
                if not getattr(hooks[k], "__module__", "").startswith("transformers"):
                    del hooks[k]
    if lm.model.config._attn_implementation != snap["attn"]:
        lm.model.set_attn_implementation(snap["attn"])


@pytest.fixture(autouse=True)
def _cycles_collected_on_the_gui_thread(request):
    """In a test with Qt widgets and the worker thread, no automatic cycle collection: run in the worker thread it
    can destroy Qt objects the GUI thread made (a segfault seen once in a fresh clone's run, while the worker loaded a
    model). The test's cycles are collected here, on the main thread, after its widgets are closed. The studio does
    the same with pyqtgraph's GarbageCollector."""
    if "qtbot" not in request.fixturenames:
        yield
        return
    import gc

    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        gc.enable()


@pytest.fixture
def demo_data() -> Path:
    """Real preference pairs (subsets of UltraFeedback and HH-RLHF) shipped in assets/data."""
    return DEMO_DATA


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory) -> Path:
    """Same shape as tiny_model_dir, other weights: a different model to direction files."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-other") / "tiny-other", seed=1)


@pytest.fixture(scope="session")
def wide_tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-wide") / "tiny-wide", seed=2, hidden=48)


@pytest.fixture(scope="session")
def tiny_pairs():
    from engine.data import load_pairs

    return load_pairs(DEMO_DATA / "ultrafeedback_helpfulness_400.jsonl", limit=24)


@pytest.fixture(scope="session")
def tiny_vector(_tiny_lm_and_snapshot, tiny_pairs):
    from engine.steering import extract

    return extract(_tiny_lm_and_snapshot[0], tiny_pairs, batch_size=6, max_response_tokens=48, max_prompt_tokens=48,
                   strength=2.0)
