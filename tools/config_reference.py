"""Write docs/configuration.md, the reference of every config key, from the schema itself.

Every key of popo_megatron/config/schema.py with its type, default and meaning: the meaning is the
schema's own comments (the lines above a field and the one after it) and each section's docstring, so the
reference cannot say something the code does not. tests/test_docs.py fails when the file is stale.

    python tools/config_reference.py            # rewrite docs/configuration.md
    python tools/config_reference.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import io
import sys
import tokenize
import typing
from pathlib import Path

from omegaconf import OmegaConf

from popo_megatron.config import schema

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"
HEADER = """# Configuration reference

Every key `popo train`, `popo eval` and `popo layout` read, with its type, default and meaning. Set them in
a YAML file (see `examples/`) or on the command line as `section.key=value`; values are read as YAML, so
text that looks like YAML needs quotes (`data.prompt_template='"{problem}"'`). An unknown key or a value
of the wrong type stops the command with one line naming the key. Cross-key rules (a layout the model
cannot take, a ratio with truncated sampling, ...) are checked before anything starts
(`popo_megatron/config/validate.py`).

This page is generated from `popo_megatron/config/schema.py` by `python tools/config_reference.py`
(a test fails when it is stale): the meanings are the schema's own comments.
"""


def _comments(source: str) -> dict[int, str]:
    """Line number (1-based) -> the comment text on that line."""
    out = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            out[token.start[0]] = token.string.lstrip("#").strip()
    return out


GROUP = "---"  # a comment line "# --- NAME" above a field starts a group of keys within a section


def _field_notes(source: str) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]:
    """(class, field) -> its comments (the block of comment lines right above it, then the one on its line),
    and (class, field) -> the group label that starts at it."""
    comments = _comments(source)
    lines = source.splitlines()
    notes, groups = {}, {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            key = (node.name, stmt.target.id)
            for text in [t for t in above if t.startswith(GROUP)]:
                groups[key] = text.removeprefix(GROUP).strip()
            inline = comments.get(stmt.lineno)
            kept = [t for t in above if not t.startswith(GROUP)]
            notes[key] = " ".join([*kept, *([inline] if inline else [])])
        for stmt in node.body:  # an enum's members: each choice's own comment
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                if stmt.lineno in comments:
                    notes[(node.name, stmt.targets[0].id)] = comments[stmt.lineno]
    return notes, groups


def _choices(tp, meanings: dict) -> str:
    """ "; `a`: what a is; ..." for an enum type whose members have comments."""
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if typing.get_origin(tp) else tp
    if not (isinstance(base, type) and issubclass(base, enum.Enum)):
        return ""
    said = [f"`{m.value}`: {meanings[(base.__name__, m.name)]}" for m in base if (base.__name__, m.name) in meanings]
    return ("; " if said else "") + "; ".join(said)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in tp)
    return getattr(tp, "__name__", str(tp))


def _default(value) -> str:
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"`{value!r}`" if value else "`''`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


Row = tuple[str, str, str, str, str | None]  # key, type, default, meaning, the group it starts


def _sections(cls: type, prefix: str, notes: tuple[dict, dict], defaults) -> list[tuple[str, type, list[Row]]]:
    """[(section key, its class, its rows)] for `cls` and its nested sections, in the schema's order."""
    meanings, groups = notes
    hints = typing.get_type_hints(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested += _sections(tp, key + ".", notes, defaults[f.name])
            continue
        if OmegaConf.is_missing(defaults, f.name):
            default = "(required)"
        else:
            value = defaults[f.name]
            default = _default(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
        where = (cls.__name__, f.name)
        meaning = meanings.get(where, "")
        rows.append(
            (key, _type_name(tp), default, meaning + (_choices(tp, meanings) if meaning else ""), groups.get(where))
        )
    return [(prefix.rstrip("."), cls, rows)] + nested


def undocumented() -> list[str]:
    """The keys without a meaning (the schema needs a comment for each)."""
    source = Path(schema.__file__).read_text()
    sections = _sections(schema.RunConfig, "", _field_notes(source), OmegaConf.structured(schema.RunConfig))
    return [row[0] for _, _, rows in sections for row in rows if not row[3]]


def render() -> str:
    source = Path(schema.__file__).read_text()
    notes = _field_notes(source)
    defaults = OmegaConf.structured(schema.RunConfig)
    parts = [HEADER]
    for key, cls, rows in _sections(schema.RunConfig, "", notes, defaults):
        if not rows:
            continue
        title = key or "top level"
        parts.append(f"\n## `{title}`\n" if key else "\n## Top level\n")
        doc = (cls.__doc__ or "").strip()
        if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses give a generated signature
            parts.append("\n" + " ".join(line.strip() for line in doc.splitlines()) + "\n")
        parts.append("\n| key | type | default | meaning |\n| --- | --- | --- | --- |\n")
        for name, tp, default, meaning, group in rows:
            if group:
                parts.append(f"| *{group}* | | | |\n")
            parts.append(f"| `{name}` | {tp} | {default} | {meaning.replace('|', chr(92) + '|')} |\n")
    return "".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is stale")
    text = render()
    if parser.parse_args().check:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run python tools/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"written: {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
