"""Shared rich progress bar (tokens/s and ETA) for every long loop."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Rate(TextColumn):
    def __init__(self, unit: str) -> None:
        super().__init__("")
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"? {self.unit}/s", style="cyan")


def progress_bar(quiet: bool = False, unit: str = "tok") -> Progress:
    """A rich ``Progress`` with description, bar, count, rate (``unit``/s), elapsed and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), _Rate(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=quiet, transient=False)
