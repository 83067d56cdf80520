"""Model-only evaluation work kept between `sae evaluate` calls: reused when every key part matches,
recomputed when any differs, when the file is damaged, or with --no-cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from sae.evaluate.registry import EvalContext


def _ctx(disk: Path | None, fingerprint: str = "fp0", hook: str = "blocks.1.hook_resid_post") -> EvalContext:
    lm = SimpleNamespace(fingerprint=fingerprint)
    return EvalContext(lm=lm, hook_name=hook, layer=1, dataset="embedded", context_size=128,  # type: ignore[arg-type]
                       run_dir=Path("."), disk_cache=disk)


def test_persisted_work_is_reused_across_calls_and_keyed_by_model_hook_and_settings(tmp_path: Path) -> None:
    calls = []

    def work(tag: str) -> dict:
        calls.append(tag)
        return {"acts": torch.arange(6.0).reshape(2, 3) + len(calls), "tag": tag}

    first = _ctx(tmp_path).cached(("absorption", "words", 3), lambda: work("a"), persist=True)
    again = _ctx(tmp_path).cached(("absorption", "words", 3), lambda: work("b"), persist=True)  # a new call
    assert calls == ["a"] and torch.equal(first["acts"], again["acts"]) and again["tag"] == "a"
    _ctx(tmp_path).cached(("absorption", "words", 4), lambda: work("c"), persist=True)        # another setting
    _ctx(tmp_path, fingerprint="fp1").cached(("absorption", "words", 3), lambda: work("d"), persist=True)
    _ctx(tmp_path, hook="blocks.2.hook_resid_post").cached(("absorption", "words", 3), lambda: work("e"),
                                                           persist=True)
    assert calls == ["a", "c", "d", "e"]
    files = sorted((tmp_path / "artifacts").iterdir())
    assert len(files) == 4 and all(f.name.startswith("absorption-") for f in files)


def test_damaged_files_are_recomputed_and_no_cache_writes_nothing(tmp_path: Path) -> None:
    _ctx(tmp_path).cached(("k",), lambda: torch.ones(3), persist=True)
    (f,) = (tmp_path / "artifacts").iterdir()
    f.write_bytes(b"not a pickle")
    assert torch.equal(_ctx(tmp_path).cached(("k",), lambda: torch.zeros(3), persist=True), torch.zeros(3))
    assert torch.equal(_ctx(tmp_path).cached(("k",), lambda: torch.ones(3), persist=True), torch.zeros(3))  # rewritten
    nothing = tmp_path / "none"
    _ctx(None).cached(("k",), lambda: torch.ones(3), persist=True)
    _ctx(nothing).cached(("k",), lambda: torch.ones(3))  # persist=False: memory only
    assert not nothing.exists()
