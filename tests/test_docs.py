"""The documentation keeps up with the code: the configuration reference is the schema's, every key has a
meaning, and every relative link of README.md and docs/ (and bench/README.md) resolves."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import config_reference  # noqa: E402

# [text](target) and <a href="target">: the target up to an optional #anchor.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|href=\"([^\"]+)\"")


def test_the_configuration_reference_is_the_schemas():
    assert (ROOT / "docs" / "configuration.md").read_text() == config_reference.render(), (
        "docs/configuration.md is stale: run python tools/config_reference.py"
    )


def test_every_config_key_has_a_meaning():
    assert config_reference.undocumented() == [], "add a comment to these keys in popo_megatron/config/schema.py"


def _documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_resolves():
    broken = []
    for doc in _documents():
        for match in LINK.finditer(doc.read_text()):
            target = (match.group(1) or match.group(2)).split("#")[0]
            if not target or re.match(r"[a-z]+://|mailto:", target):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, f"links to nothing: {broken}"
