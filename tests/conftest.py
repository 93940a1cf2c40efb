"""Test set-up: CPU runs use the Triton interpreter; `gpu` tests are skipped without a GPU."""
import os

import torch

# Must happen before any module with @triton.jit is imported: the decorator reads it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads on a shared CPU, and one thread keeps fp32 sums in one
    order. Module scope: a module asks for it once (an autouse fixture of its own that requests it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    """A prepared small corpus (vocab 512) shared by the tests that train."""
    from fastcram.config import DataConfig
    from fastcram.data.prepare import prepare

    from .helpers import write_small_corpus

    root = tmp_path_factory.mktemp("small_data")
    src = write_small_corpus(str(root / "src" / "corpus.txt"))
    out = str(root / "prepared")
    # A 512-word vocabulary splits words finely, so the recipe threshold (0.25) would drop everything.
    prepare([src], out, DataConfig(vocab_size=512, shard_blocks=256, compression_threshold=0.6), progress=False)
    return out


@pytest.fixture(scope="session")
def heldout_data(tmp_path_factory) -> str:
    """The small corpus (vocab 512) prepared with a quarter of its documents held out."""
    from fastcram.config import DataConfig
    from fastcram.data.prepare import PrepareOptions, prepare

    from .helpers import write_small_corpus

    root = tmp_path_factory.mktemp("heldout_data")
    src = write_small_corpus(str(root / "src" / "corpus.txt"))
    out = str(root / "prepared")
    prepare([src], out, DataConfig(vocab_size=512, shard_blocks=256, compression_threshold=0.6), progress=False,
            options=PrepareOptions(holdout_rate=0.25, holdout_max_docs=None))
    return out


@pytest.fixture(scope="session")
def checkpointed_run(small_data, tmp_path_factory) -> str:
    """A tiny run on the small corpus with step-00000000.pt ... step-00000003.pt and final.pt (step 4); tests
    spoil copies of it, never the run itself."""
    from fastcram.config import RunOptions, TrainConfig, preset
    from fastcram.train.loop import train

    from .helpers import FakeClock

    tcfg = TrainConfig(**{**preset("tiny").train_overrides, "compile": False, "device": "cpu", "micro_batch": 8,
                          "final_batch": 8, "log_interval_s": 0.0, "budget_s": 1e6, "max_steps": 4,
                          "checkpoint_interval_s": 1.0, "keep_checkpoints": 10})
    out = str(tmp_path_factory.mktemp("checkpointed") / "run")
    train(RunOptions(train=tcfg, preset="tiny", data_dir=small_data, out_dir=out, progress=False), now=FakeClock(1.0))
    return out
