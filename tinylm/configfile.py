"""Config files: the named recipes (`--config small`) and reading YAML with errors that say where.

The recipes are the YAML files of the checkout's top-level configs/ folder, which a wheel carries inside
the package (pyproject.toml maps the folder there), so a name works after `pip install .` as in a
checkout. Reading turns every YAML problem into one line naming the file, line and column. What the
settings mean, and checking them, is tinylm/config.py's job.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from tinylm.errors import UserError


def recipes_dir() -> Path:
    """The folder of named recipes: inside the installed package (a wheel carries the checkout's configs/
    there, see pyproject.toml), else the configs/ folder next to the package (a checkout, editable or not)."""
    here = Path(__file__).resolve().parent
    packaged = here / "configs"
    return packaged if packaged.is_dir() else here.parent / "configs"


def recipes() -> dict[str, Path]:
    """{name: file} of the named recipes, e.g. 'small' for configs/small.yaml."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def resolve(name_or_path: str | Path) -> Path:
    """The config file meant by a path or a recipe name: an existing file wins, then a recipe of that name."""
    p, known = Path(name_or_path), recipes()
    if p.is_file():
        return p
    if str(name_or_path) in known:
        return known[str(name_or_path)]
    listing = f"recipes: {', '.join(known)}" if known else "no recipes found in " + str(recipes_dir())
    if p.is_dir():
        raise UserError(f"{p} is a folder, not a config file; name a YAML file or a recipe ({listing})")
    guess = p.stem if p.stem in known else next(iter(difflib.get_close_matches(str(name_or_path), known, n=1)), "")
    hint = f"; did you mean the recipe '{guess}'?" if guess else ""
    raise UserError(f"config file not found: {p}{hint} ({listing})")


def read_yaml(p: Path) -> Any:
    """The YAML in file p; a syntax error names the file, line, column and problem in one line."""
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise UserError(f"config file {p} is not valid UTF-8 (byte {e.start}, line {line})") from None

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        where = f" at {_position(e.problem_mark.line, e.problem_mark.column)}" if e.problem_mark else ""
        # The context helps when it points elsewhere (where an unclosed list began), not otherwise
        # ("while scanning for the next token").
        mark = e.context_mark
        context = f" ({e.context}, {_position(mark.line, mark.column)})" if e.context and mark else ""
        raise UserError(f"config file {p} is not valid YAML{where}: {e.problem}{context}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow; its position counts characters
        line_start = text.rfind("\n", 0, e.position) + 1
        where = _position(text.count("\n", 0, e.position), e.position - line_start)
        char = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        raise UserError(f"config file {p} is not valid YAML at {where}: character {char} is not allowed") from None


def _position(line: int, column: int) -> str:
    """A place in a file as editors number it (yaml counts lines and columns from 0)."""
    return f"line {line + 1}, column {column + 1}"


def parse_override_value(text: str) -> Any:
    """Read a command-line value the way YAML would ("4" -> 4, "true" -> True, "a" -> "a")."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text
