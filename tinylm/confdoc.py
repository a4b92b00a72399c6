"""The configuration reference, generated from the help texts on the config dataclasses.

Each setting is documented once, where it is defined (`setting(default, help)` in `tinylm.config`). This
module turns those texts into the field listing of `tinylm train --help` and into docs/config.md, so the
two cannot disagree with the code or with each other. Regenerate the page after changing a setting:

    python -m tinylm.confdoc > docs/config.md

(a test fails, naming that command, when the page is out of date).
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from typing import Any

from tinylm import config, configfile

REGENERATE = "python -m tinylm.confdoc > docs/config.md"

COMBINE = """\
Settings are applied in this order, each step overriding the one before:

1. the built-in defaults (listed below; `configs/default.yaml` spells them out);
2. `--config NAME_OR_FILE`: a recipe name (`--config small`) or a YAML file of your own
   (`--config my.yaml`); it sets only the fields it names. An existing file wins over a recipe of the
   same name. `--resume RUN_DIR` without `--config` starts from the run's own saved settings instead;
3. `--section.field=VALUE` (or `--section.field VALUE`) on the command line, read as YAML: `true`,
   `3e-4`, `[a.txt, b.txt]`. `--data PATH ...` sets `data.paths` and `--init_from DIR` sets
   `train.init_from`.

Every value is checked before any data is read: a wrong type, an impossible value or an unknown key (with
the closest valid one) is one `error:` line. A config file is YAML with the sections `model`, `data` and
`train`:

```yaml
model:
  n_layer: 6
  dropout: 0.2
train:
  lr: 0.001
```"""


@dataclass(frozen=True)
class FieldDoc:
    """One setting as the documentation shows it."""

    section: str
    name: str
    type: str  # as annotated: int, float, bool, str, list[str]
    default: Any
    help: str
    choices: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def metavar(self) -> str:
        """What to write after `=`: the choices, or the type's name (INT, FLOAT, BOOL, TEXT, LIST)."""
        if self.choices:
            return "|".join(self.choices)
        return {"str": "TEXT", "list[str]": "LIST"}.get(self.type, self.type.upper())

    @property
    def default_text(self) -> str:
        """The default as you would write it on the command line."""
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if self.default in ("", []):
            return "''" if self.default == "" else "[]"
        return repr(self.default) if isinstance(self.default, float) else str(self.default)


def fields() -> list[FieldDoc]:
    """Every setting, in section and field order."""
    defaults = config.Config()
    return [FieldDoc(section, f.name, str(f.type), getattr(getattr(defaults, section), f.name),
                     f.metadata["help"], f.metadata["choices"])
            for section, cls in config.SECTIONS.items() for f in dataclasses.fields(cls)]


def section_summary(section: str) -> str:
    """A section's description: its dataclass docstring as one paragraph."""
    return " ".join((config.SECTIONS[section].__doc__ or "").split())


def recipe_summaries() -> dict[str, str]:
    """{recipe name: the first line of the recipe file's leading comment}."""
    summaries = {}
    for name, path in configfile.recipes().items():
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        summaries[name] = first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""
    return summaries


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` characters, never breaking a word or a name such as AVX-512."""
    return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)


def _row(name: str, text: str, width: int, column: int = 32) -> list[str]:
    """`name`, then `text` wrapped beside it from `column` on (below it when the name is too long)."""
    lines = [" " * column + line for line in _wrap(text, max(width - column, 30)) or [""]]
    if len(name) + 2 > column:
        return [name, *lines]
    return [name.ljust(column) + lines[0].lstrip(), *lines[1:]]


def help_text(width: int = 100) -> str:
    """The settings and recipes part of `tinylm train --help`, wrapped to `width` columns."""
    out = _wrap("settings (--section.field=VALUE, read as YAML; they override --config, which overrides the "
                "defaults):", width)
    for section in config.SECTIONS:
        out += ["", *_wrap(f"{section}: {section_summary(section)}", width)]
        for f in (f for f in fields() if f.section == section):
            out += _row(f"  --{f.key}={f.metavar}", f"{f.help} (default: {f.default_text})", width)
    out += ["", "recipes (--config NAME; or a path to a YAML file of your own):"]
    for name, summary in recipe_summaries().items():
        out += _row(f"  {name}", summary, width)
    return "\n".join(out)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("*", "\\*")


def markdown() -> str:
    """docs/config.md: how settings combine, the recipes, then every field by section."""
    out = ["# Configuration", "",
           f"<!-- Generated from the help texts in tinylm/config.py by `{REGENERATE}`; do not edit. -->", "",
           "Every setting of a run, its default and what it is for. `tinylm train --help` prints the same list.",
           "", "## How settings combine", "", COMBINE, "", "## Recipes", "",
           "Named configurations shipped with tinylm (the files are in `configs/`); use one with",
           "`tinylm train --config NAME`.", "", "| name | what it is |", "| --- | --- |"]
    out += [f"| `{name}` | {_cell(summary)} |" for name, summary in recipe_summaries().items()]
    for section in config.SECTIONS:
        out += ["", f"## {section}", "", section_summary(section), "",
                "| setting | type | default | what it does |", "| --- | --- | --- | --- |"]
        out += [f"| `{f.key}` | {'one of ' + ', '.join(f.choices) if f.choices else f.type} | `{f.default_text}` | "
                f"{_cell(f.help)} |" for f in fields() if f.section == section]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
