"""What evaluations may read of a run's training state, without knowing how training stores it.

The penalty's buffers (an ``adaptive`` run's group assignment, EMAs, ...) are saved at the end of a
run in ``penalty_state.safetensors``; an unfinished run has them only inside its checkpoint, whose
layout belongs to the trainer. :func:`penalty_buffers` hides that difference.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .format import CHECKPOINT_FILE, PENALTY_STATE_FILE


def penalty_buffers(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The penalty's buffers ``{name: tensor}`` and the file they came from.

    From ``penalty_state.safetensors`` (a finished run), else from ``checkpoint.pt`` (an unfinished
    one: the trainer state's ``penalty.*`` entries, names without the prefix). ``({}, None)`` when
    neither holds any, or the checkpoint cannot be read (it is then not a source, not an error).
    """
    run_dir = Path(run_dir)
    state_file = run_dir / PENALTY_STATE_FILE
    if state_file.is_file():
        from safetensors.torch import load_file

        return dict(load_file(str(state_file))), PENALTY_STATE_FILE
    ckpt = run_dir / CHECKPOINT_FILE
    if ckpt.is_file():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            model = state.get("trainer", {}).get("model", {})
        except Exception:  # noqa: BLE001 - an unreadable or foreign checkpoint is not a source
            return {}, None
        out = {k[len("penalty."):]: v for k, v in model.items()
               if isinstance(k, str) and k.startswith("penalty.") and isinstance(v, torch.Tensor)}
        return out, CHECKPOINT_FILE if out else None
    return {}, None
