"""Config files: the named recipes (`--config small`) and reading YAML with errors that say where.

The recipes are the YAML files of the checkout's top-level configs/ folder, which a wheel carries inside
the package (pyproject.toml maps the folder there), so a name works after `pip install .` as in a
checkout. Reading turns every YAML problem into one line naming the file, line and column, and refuses a file
whose aliases would expand past MAX_NODES values (nine nested lists of nine aliases each are 387 million
strings: a few hundred bytes of YAML that would fill the memory) before anything is built. What the
settings mean, and checking them, is tinylm/config.py's job.
"""

from __future__ import annotations

import codecs
import difflib
from pathlib import Path
from typing import Any

import yaml

from tinylm.errors import UserError, shown

MAX_NODES = 100_000  # values a config may hold once its aliases are expanded (a real one holds under 100)


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
        bom = next((name for bom, name in ((codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
                    if e.object.startswith(bom)), "")
        if bom:
            raise UserError(f"config file {p} is {bom} (it starts with a byte-order mark); save it as UTF-8") from None
        line = e.object[:e.start].count(b"\n") + 1
        raise UserError(f"config file {p} is not valid UTF-8 (byte {e.start}, line {line})") from None
    return parse_yaml(text, f"config file {p}")


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, which first counts what the document's aliases would expand to."""

    def construct_document(self, node: yaml.Node) -> Any:
        expanded_size(node, {}, set())
        return super().construct_document(node)


class _TooLarge(Exception):
    pass


def expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values `node` holds with every alias expanded, counted without expanding any (an alias is
    the same node object as its anchor, whose size is counted once); _TooLarge past MAX_NODES or for a
    node that contains itself."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise _TooLarge("an alias refers to a node that contains it")
    open_.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(expanded_size(child, sizes, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(expanded_size(k, sizes, open_) + expanded_size(v, sizes, open_) for k, v in node.value)
    if size > MAX_NODES:
        raise _TooLarge(f"its aliases expand to more than {MAX_NODES:,} values")
    open_.discard(key)
    sizes[key] = size
    return size


def parse_yaml(text: str, what: str) -> Any:
    """The YAML in `text` (the contents of `what`); one line naming the place of any problem."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except _TooLarge as e:
        raise UserError(f"{what} is refused: {e}") from None
    except RecursionError:
        raise UserError(f"{what} is refused: it nests too deeply") from None
    except ValueError as e:  # a number Python will not convert (past 4,300 digits)
        raise UserError(f"{what} holds a value tinylm cannot read: {shown(str(e))}") from None
    except yaml.MarkedYAMLError as e:
        where = f" at {_position(e.problem_mark.line, e.problem_mark.column)}" if e.problem_mark else ""
        # The context helps when it points elsewhere (where an unclosed list began), not otherwise
        # ("while scanning for the next token").
        mark = e.context_mark
        context = f" ({e.context}, {_position(mark.line, mark.column)})" if e.context and mark else ""
        raise UserError(f"{what} is not valid YAML{where}: {e.problem}{context}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow; its position counts characters
        line_start = text.rfind("\n", 0, e.position) + 1
        where = _position(text.count("\n", 0, e.position), e.position - line_start)
        char = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        raise UserError(f"{what} is not valid YAML at {where}: character {char} is not allowed") from None


def _position(line: int, column: int) -> str:
    """A place in a file as editors number it (yaml counts lines and columns from 0)."""
    return f"line {line + 1}, column {column + 1}"


def parse_override_value(text: str) -> Any:
    """Read a command-line value the way YAML would ("4" -> 4, "true" -> True, "a" -> "a")."""
    if not text.strip():
        return text
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except (yaml.YAMLError, _TooLarge, ValueError, RecursionError):  # not YAML: the text itself
        return text
