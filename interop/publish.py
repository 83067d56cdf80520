"""Publishing run directories in the layout SAELens users download (``sae push``).

The layout is the one SAELens' ``upload_saes_to_huggingface`` writes and ``SAE.from_pretrained(repo_id,
sae_id)`` / ``SAE.load_from_disk`` read: one folder per SAE, named by its ``sae_id``, holding
``cfg.json`` and ``sae_weights.safetensors`` (our run directories already hold both in SAELens 6's
format), plus a ``README.md`` model card at the root with ``library_name: saelens``. We add each
SAE's ``eval_results/*.json`` beside it (SAELens ignores them), and the card lists the store, the
variant and the headline evaluation numbers.

``--to-dir DIR`` writes that layout locally (built beside, swapped in; ``--overwrite`` replaces only a
folder ``sae push`` wrote, marked :data:`PUBLISH_MARKER`). ``--repo-id USER/NAME`` builds it in a
temporary folder and uploads it with ``huggingface_hub`` (``create_repo(exist_ok=True)`` then one
``upload_folder`` commit), so a failure leaves the repository as it was.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError, SaeError
from ..outputs import build_output
from ..rundir.format import CFG_FILE, WEIGHTS_FILE
from ..rundir.results import get_metric
from ..rundir.sae import SAE

PUBLISH_MARKER = ".sae_publish"
"""File in the root of a folder ``sae push --to-dir`` wrote (JSON: version, created, sae ids)."""

HEADLINE = (  # (evaluation, category or None, metric, column)
    ("core", None, "explained_variance", "expl. var."), ("core", None, "ce_loss_score", "CE loss score"),
    ("core", None, "l0", "L0"), ("ground_truth", "classification", "f1_score", "GT F1"),
    ("ground_truth", "recovery", "mcc", "GT MCC"), ("ground_truth", "absorption", "absorption_rate", "GT absorption"),
    ("absorption", None, "mean_absorption_fraction_score", "absorption"),
    ("sparse_probing", None, "sae_top_1_test_accuracy", "probing top-1"),
)
_SAE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*(/[A-Za-z0-9][A-Za-z0-9._=+-]*)*$")


def is_publish_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder ``sae push --to-dir`` wrote."""
    return (Path(path) / PUBLISH_MARKER).is_file()


def plan(run_dirs: list[str | Path], sae_ids: list[str] | None = None) -> dict[str, Path]:
    """``sae_id → run directory``; ids default to the run directories' names. Every run is loaded
    (finite weights, a SAELens-readable ``cfg.json``) before anything is written.

    Raises:
        ConfigError: no runs, a run that does not load, a bad or repeated id, ids not one per run.
    """
    if not run_dirs:
        raise ConfigError("name at least one run directory to publish")
    ids = sae_ids or [Path(r).resolve().name for r in run_dirs]
    if len(ids) != len(run_dirs):
        raise ConfigError(f"--sae-id was given {len(ids)} times for {len(run_dirs)} runs: give one per run, in order")
    out: dict[str, Path] = {}
    for sae_id, run in zip(ids, run_dirs, strict=True):
        if not _SAE_ID.match(sae_id) or ".." in sae_id:
            raise ConfigError(f"sae id {sae_id!r}: use letters, digits and ._=+- (folders separated by /)")
        if sae_id in out:
            raise ConfigError(f"two runs would be published as {sae_id!r}: give each a distinct --sae-id")
        try:
            SAE.load(run)
        except (FileNotFoundError, SaeError, ValueError) as e:
            raise ConfigError(f"{run}: {str(e).splitlines()[0]}") from None
        out[sae_id] = Path(run)
    return out


def headline(run: Path) -> dict[str, float]:
    """The headline numbers among the run's ``eval_results`` (see :data:`HEADLINE`), by column name."""
    row: dict[str, float] = {}
    for ev, category, metric, column in HEADLINE:
        path = run / "eval_results" / f"{ev}.json"
        if path.is_file():
            try:
                value = get_metric(json.loads(path.read_text()), metric, category)
            except (ValueError, AttributeError):
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                row[column] = float(value)
    return row


def model_card(repo_id: str | None, saes: dict[str, Path]) -> str:
    """README.md: SAELens front matter, a table of the SAEs (architecture, penalty, width, k, hook, model,
    store and digest, training tokens) and their headline evaluations, and how to load them."""
    cfgs = {i: json.loads((p / CFG_FILE).read_text()) for i, p in saes.items()}
    models = sorted({str(c.get("model_name")) for c in cfgs.values()})
    lines = ["---", "library_name: saelens", "tags:", "- sparse-autoencoder", "- sae",
             *sorted({f"- {c.get('variant', 'none')}" for c in cfgs.values() if c.get("variant", "none") != "none"}),
             "---", "", f"# Sparse autoencoders on {', '.join(models)}", "",
             f"Trained with [`sae`](https://pypi.org/project/sae/) {__version__}; the layout is SAELens' (one folder "
             "per SAE with `cfg.json` and `sae_weights.safetensors`).", "",
             "| sae_id | architecture | penalty | d_in | d_sae | k | hook | training tokens | store | content digest |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- | --- |"]
    for sae_id, c in cfgs.items():
        k = (c.get("activation_fn_kwargs") or {}).get("k", "")
        arch = c.get("trained_architecture") or c.get("architecture")
        lines.append(f"| `{sae_id}` | {arch} | {c.get('variant', 'none')} | {c.get('d_in')} | {c.get('d_sae')} | {k} | "
                     f"`{c.get('hook_name')}` | {c.get('training_tokens', '')} | {c.get('store_url', '')} | "
                     f"{c.get('content_digest', '')} |")
    rows = {i: headline(p) for i, p in saes.items()}
    cols = [col for *_, col in HEADLINE if any(col in r for r in rows.values())]
    if cols:
        lines += ["", "Evaluations (each SAE's `eval_results/<evaluation>.json` has the full results and intervals):",
                  "", "| sae_id | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
        for sae_id, r in rows.items():
            lines.append(f"| `{sae_id}` | " + " | ".join(f"{r[c]:.4f}" if c in r else "" for c in cols) + " |")
    first = next(iter(saes))
    load = (f'sae = SAE.from_pretrained("{repo_id}", "{first}")' if repo_id
            else f'sae = SAE.load_from_disk("{first}")')
    lines += ["", "Load with SAELens:", "", "```python", "from sae_lens import SAE", "", load, "```", "",
              "or evaluate and compare with `sae`: `sae import DIR/<sae_id> --from saelens --out RUN`.", ""]
    return "\n".join(lines)


def write_layout(saes: dict[str, Path], target: Path, repo_id: str | None) -> None:
    """Write the layout (see the module doc) into the existing empty folder ``target``."""
    for sae_id, run in saes.items():
        dst = target / sae_id
        dst.mkdir(parents=True)
        for name in (CFG_FILE, WEIGHTS_FILE):
            shutil.copy2(run / name, dst / name)
        if (run / "eval_results").is_dir():
            shutil.copytree(run / "eval_results", dst / "eval_results")
    (target / "README.md").write_text(model_card(repo_id, saes))


def to_dir(saes: dict[str, Path], out: str | Path, overwrite: bool = False) -> Path:
    """Write the layout into ``out`` (absent or empty; or, with ``overwrite``, a folder ``sae push`` wrote).

    Raises:
        SaeError: ``out`` exists (without ``overwrite``) or is not ours.
    """
    with build_output(out, overwrite=overwrite, is_ours=is_publish_dir, what="a folder written by sae push",
                      error=ConfigError) as target:
        target.mkdir(parents=True, exist_ok=True)
        write_layout(saes, target, None)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (target / PUBLISH_MARKER).write_text(json.dumps({"sae_version": __version__, "sae_ids": list(saes),
                                                         "created": created}))
    return Path(out)


def push(saes: dict[str, Path], repo_id: str, revision: str = "main", private: bool = False,
         api: Any = None) -> str:
    """Upload the layout to the Hugging Face Hub as one commit; returns the repository URL.

    Raises:
        ConfigError: a malformed ``repo_id``. SaeError: the Hub refused (no token, no permission, offline),
        in one line; nothing was committed then.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", repo_id):
        raise ConfigError(f"--repo-id {repo_id!r}: give USER/NAME (or ORG/NAME)")
    if api is None:
        try:
            from huggingface_hub import HfApi
        except ImportError:
            raise ConfigError("uploading needs huggingface_hub: pip install 'sae[pretrained]' (or write the "
                              "layout with --to-dir)") from None
        api = HfApi()
    with tempfile.TemporaryDirectory(prefix="sae-push-") as tmp:
        write_layout(saes, Path(tmp), repo_id)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(folder_path=tmp, repo_id=repo_id, revision=revision, repo_type="model",
                              commit_message=f"Upload {len(saes)} SAE(s) with sae {__version__}")
        except Exception as e:  # noqa: BLE001 - the hub client raises many kinds (HTTP, auth, offline)
            raise SaeError(f"uploading to {repo_id} failed ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
                           "log in with `hf auth login` (or set HF_TOKEN) and check the repo id") from None
    return str(url)


__all__ = ["PUBLISH_MARKER", "headline", "is_publish_dir", "model_card", "plan", "push", "to_dir", "write_layout"]
