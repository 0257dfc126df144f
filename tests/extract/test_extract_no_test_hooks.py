"""Production code carries no hook for tests (issue 17 item 3): the tests that slow a rank down wrap the extractor's
encode step from outside (`_extract_slow_rank_worker.py`) and then run the extractor's own `main()`."""

import importlib.util
from pathlib import Path

import siglip_navit_tools

PACKAGE = Path(siglip_navit_tools.__file__).parent
WORKER = Path(__file__).with_name("_extract_slow_rank_worker.py")


def test_no_test_hook_in_the_tools():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "_TEST_" not in text and "TEST_DELAY" not in text, path
    assert "os.environ" not in (PACKAGE / "extract" / "run.py").read_text()


def test_the_worker_slows_only_the_ranks_it_is_told(monkeypatch):
    spec = importlib.util.spec_from_file_location("_extract_slow_rank_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)  # not run as __main__: it only defines its helpers
    assert worker.delays("1:2.5,3:1") == {1: 2.5, 3: 1.0} and worker.delays("") == {}
    slept = []
    monkeypatch.setattr(worker.time, "sleep", slept.append)
    wrapped = worker.slowed(lambda *args, **kwargs: ("encoded", args, kwargs), 2.5)
    assert wrapped(1, save_grids=True) == ("encoded", (1,), {"save_grids": True}) and slept == [2.5]
