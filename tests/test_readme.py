"""README's configuration reference cannot drift from the models."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from sqsbalancerd.config import QueueOverride, Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _resolve(path: str) -> bool:
    model: type[BaseModel] = Settings
    for part in path.split("."):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return True


def _keys_in_table(section: str) -> list[str]:
    keys: list[str] = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        names = re.findall(r"`([a-z_.\[\]]+)`", first_cell)
        prefix = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
        for name in names:
            if name.startswith("["):
                continue
            keys.append(name if "." in name or not prefix else f"{prefix}.{name}")
    return keys


def test_every_key_in_the_readme_configuration_table_exists():
    keys = _keys_in_table(_section(README.read_text(), "## Configuration"))
    assert len(keys) > 20
    missing = [key for key in keys if not _resolve(key)]
    assert missing == []


def test_every_queue_override_key_in_the_readme_exists():
    section = _section(README.read_text(), "## Configuration")
    row = next(line for line in section.splitlines() if line.startswith("| `[[queue]]`"))
    named = re.findall(r"`([a-z_]+)`", row.split("|")[3])
    assert named, row
    assert set(named) - {"match"} <= set(QueueOverride.model_fields)


def test_every_settings_section_appears_in_the_readme_table():
    keys = _keys_in_table(_section(README.read_text(), "## Configuration"))
    sections = {key.split(".")[0] for key in keys}
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            assert name in sections, name
