"""docs/configuration.md is generated from the config classes and must match them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from elastictrain import config_docs
from elastictrain.config import _Config

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "configuration.md"


def test_committed_page_matches_the_config_classes():
    assert PAGE.read_text(encoding="utf-8") == config_docs.render(), (
        "docs/configuration.md is stale: run `python -m elastictrain.config_docs`"
    )


def test_every_field_has_a_description():
    assert config_docs.missing_descriptions() == []
    for model, _ in config_docs.CONFIGS:
        for name, field in model.model_fields.items():
            assert (field.description or "").strip(), f"{model.__name__}.{name} has no description"


def test_every_public_config_is_on_the_page():
    import elastictrain as et

    public = {name for name in et.__all__ if name.endswith("Config")}
    assert public == {model.__name__ for model, _ in config_docs.CONFIGS}
    page = config_docs.render()
    for model, _ in config_docs.CONFIGS:
        assert f"## {model.__name__}\n" in page
        for name in model.model_fields:
            assert f"| `{name}` |" in page


def test_a_field_renders_its_type_limits_default_and_description():
    class Demo(_Config):
        """A demo config.

        Second paragraph.
        """

        retries: int = Field(3, ge=1, le=9, description="How often | to retry.")
        window_s: float | None = Field(None, gt=0, description="A window\n  over lines.")
        names: dict[str, float] = Field(default_factory=lambda: {"a": 1.0}, description="Names.")
        spec: str = Field(..., description="Required.")

    text = config_docs.render_class(Demo, "Demo(...)")
    assert text.startswith("## Demo\n\nPassed as `Demo(...)`.\n\nA demo config.\n\nSecond paragraph.\n")
    assert "| `retries` | `int` (>= 1, <= 9) | `3` | How often \\| to retry. |" in text
    assert "| `window_s` | `float or None` (> 0) | `None` | A window over lines. |" in text
    assert "| `names` | `dict[str, float]` | `{'a': 1.0}` | Names. |" in text
    assert "| `spec` | `str` | required | Required. |" in text


def test_missing_description_is_reported():
    class Holey(_Config):
        """Holey."""

        fine: int = Field(0, description="Fine.")
        blank: int = Field(0, description="  ")
        none: int = 0

    assert config_docs.missing_descriptions([(Holey, "x")]) == ["Holey.blank", "Holey.none"]


def test_check_passes_on_a_fresh_page_and_fails_on_a_stale_one(tmp_path, capsys):
    page = tmp_path / "docs" / "configuration.md"
    assert config_docs.main(["--check", "--path", str(page)]) == 1  # missing
    assert "cannot read" in capsys.readouterr().err
    assert config_docs.main(["--path", str(page)]) == 0
    assert config_docs.main(["--check", "--path", str(page)]) == 0
    page.write_text(page.read_text().replace("Samples per optimizer step", "Samples per step"))
    assert config_docs.main(["--check", "--path", str(page)]) == 1
    assert "is stale" in capsys.readouterr().err


def test_check_fails_when_a_description_changes(tmp_path, monkeypatch):
    page = tmp_path / "configuration.md"
    assert config_docs.main(["--path", str(page)]) == 0
    field = config_docs.BatchConfig.model_fields["seed"]
    monkeypatch.setattr(field, "description", "Another description.")
    assert config_docs.main(["--check", "--path", str(page)]) == 1


@pytest.mark.parametrize("argv", [[], ["--check"]])
def test_a_field_without_description_fails_the_command(tmp_path, monkeypatch, argv):
    monkeypatch.setattr(config_docs.RunConfig.model_fields["seed"], "description", None)
    assert config_docs.main([*argv, "--path", str(tmp_path / "c.md")]) == 1
