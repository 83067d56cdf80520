"""Defaults and help written once: every CLI option of `train`, `sweep` and `harvest` that is a field
of TrainConfig/HarvestConfig has that field's default (and its docstring in the help), and the help of
`harvest`'s store-identity options shows the default a new harvest takes."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from sae.cli import app
from sae.harvest.harvest import DEFAULT_TOKENS, IDENTITY_DEFAULTS, HarvestConfig
from sae.params import field_docs
from sae.train.config import TrainConfig

CLI_TO_FIELD = {"hook": "hook_name", "layer": "layers"}
NOT_FIELDS = {"storage_option", "param", "config", "quiet", "jumprelu_sparsity", "jumprelu_variant", "variants",
              "grid", "seeds", "workers", "scheduler", "out", "group_size", "log_to", "nproc"}
"""Options that are not a config field one to one (parsed into one, or the command's own)."""


def _default(f: dataclasses.Field) -> object:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _params(command: str) -> list:
    return typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]


@pytest.mark.parametrize(("command", "cls"), [("train", TrainConfig), ("sweep", TrainConfig),
                                              ("harvest", HarvestConfig)])
def test_every_cli_default_is_its_config_fields(command: str, cls: type) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs = field_docs(cls)
    checked = 0
    for p in _params(command):
        name = CLI_TO_FIELD.get(p.name, p.name)
        if p.name in NOT_FIELDS and not (command == "harvest" and p.name in ("out", "workers", "scheduler")):
            continue
        assert name in fields, f"sae {command} --{p.name}: not a field of {cls.__name__}; add it to NOT_FIELDS"
        want = _default(fields[name])
        if command == "harvest" and name in (*IDENTITY_DEFAULTS, "tokens", "workers", "layers"):
            assert p.default is None or name == "layers", (command, p.name)  # unset: resolved later
        else:
            assert p.default == want, f"sae {command} --{p.name} defaults to {p.default!r}, {cls.__name__}.{name} " \
                                      f"to {want!r}"
        if name in docs:
            assert p.help.startswith(docs[name]), f"sae {command} --{p.name}: help is not {cls.__name__}.{name}'s doc"
        checked += 1
    assert checked >= {"train": 22, "sweep": 14, "harvest": 19}[command]


def test_harvest_help_shows_the_default_a_new_harvest_takes() -> None:
    helps = {p.name: p.help for p in _params("harvest")}
    for name, value in IDENTITY_DEFAULTS.items():
        assert f"(default: {value}; growing a store: the store's)" in helps[name], name
    assert f"(default: {DEFAULT_TOKENS})" in helps["tokens"]
    assert HarvestConfig().resolved().tokens == DEFAULT_TOKENS
    assert {k: getattr(HarvestConfig().resolved(), k) for k in IDENTITY_DEFAULTS} == IDENTITY_DEFAULTS


def test_field_docs_reads_attribute_docstrings() -> None:
    @dataclasses.dataclass
    class Base:
        a: int = 1
        """The ``a`` value,
        on two lines."""
        b: int = 2

    @dataclasses.dataclass
    class Child(Base):
        b: int = 3
        """Child's b."""

    assert field_docs(Child) == {"a": "The `a` value, on two lines.", "b": "Child's b."}
