"""`attnserve predict` in-process and against the real server process: the table, --json,
overlay files (one per image, a --compare grid), and errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, ZOO_MODELS
from PIL import Image

from service.cli import main
from service.overlay import legend_height

pytestmark = pytest.mark.slow

DIGIT = EXAMPLES / "digit-7.png"


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, zoo_env: dict[str, str]) -> None:
    """Settings for a run inside the test process: the zoo subset, and no stray ATTNSERVE_*."""
    for name in [n for n in os.environ if n.startswith("ATTNSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in zoo_env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, np.ndarray]) -> Path:
    """A 640x427 photo, larger than the overlay cap of 512."""
    path = tmp_path_factory.mktemp("photos") / "china.jpg"
    Image.fromarray(photos["china"]).save(path, quality=90)
    return path


def table_rows(text: str) -> list[list[str]]:
    lines = text.strip().splitlines()
    assert lines[0].split() == ["image", "model", "rank", "label", "probability"]
    return [line.split() for line in lines[1:]]


def test_in_process_table_equals_the_servers_answer(
    in_process: None, zoo_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["predict", str(DIGIT), "--model", "digits-cbam", "--top-k", "3"]
    assert main(args) == 0
    local = table_rows(capsys.readouterr().out)
    assert main([*args, "--url", zoo_server]) == 0
    remote = table_rows(capsys.readouterr().out)
    assert local == remote
    assert local[0][:4] == ["digit-7.png", "digits-cbam", "1", "7"]
    assert len(local) == 3 and float(local[0][4]) > float(local[1][4]) >= float(local[2][4])


def test_json_output_is_the_v1_answer(zoo_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["predict", str(DIGIT), str(EXAMPLES / "digit-3.png"), "--attention", "gc"]
    assert main([*args, "--url", zoo_server, "--json", "--maps", "layers"]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert [a["image"] for a in answers] == [str(DIGIT), str(EXAMPLES / "digit-3.png")]
    tops = [a["results"][0]["predictions"][0]["label"] for a in answers]
    assert tops == ["7", "3"]
    result = answers[0]["results"][0]
    assert result["model"] == "digits-gc" and result["image"] == {"width": 64, "height": 64}
    assert np.asarray(result["attention"]["summary"]["data"]).shape == (64, 64)
    assert {layer["kind"] for layer in result["attention"]["layers"]} == {"context"}


def test_overlay_files_follow_each_images_size(
    zoo_server: str, photo_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "overlays"
    args = ["predict", str(DIGIT), str(photo_file), "--model", "digits-cbam", "--url", zoo_server]
    assert main([*args, "--overlay-dir", str(out), "--colormap", "inferno"]) == 0
    digit = Image.open(out / "digit-7-digits-cbam.png")
    photo = Image.open(out / "china-digits-cbam.png")
    assert digit.size == (64, 64 + legend_height(64))
    assert photo.size == (512, 342 + legend_height(512))  # 640x427 capped to 512
    assert "wrote" in capsys.readouterr().err


def test_compare_writes_one_grid_with_a_panel_per_model(
    in_process: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid_path = tmp_path / "grid.png"
    args = ["predict", str(DIGIT), "--compare", "--top-k", "1", "--overlay", str(grid_path)]
    assert main(args) == 0
    rows = table_rows(capsys.readouterr().out)
    assert sorted(row[1] for row in rows) == sorted(ZOO_MODELS)
    grid = Image.open(grid_path)
    panel = 192  # the grid enlarges the 64x64 digit to 192 px panels
    assert grid.width == len(ZOO_MODELS) * (panel + 6) + 6
    assert grid.height > panel + legend_height(panel)


def test_errors_are_reported(
    zoo_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    assert main(["predict", str(text), str(DIGIT), "--url", zoo_server]) == 1
    captured = capsys.readouterr()
    assert "400 invalid_image" in captured.err
    assert table_rows(captured.out)[0][:2] == ["digit-7.png", "digits-cbam"]
    assert main(["predict", str(tmp_path / "missing.png"), "--url", zoo_server]) == 2
    assert "no such file" in capsys.readouterr().err
    args = ["predict", str(DIGIT), str(DIGIT), "--overlay", "x.png", "--url", zoo_server]
    assert main(args) == 2
    assert "--overlay-dir" in capsys.readouterr().err
    assert main(["predict", str(DIGIT), "--model", "nope", "--url", zoo_server]) == 1
    assert "404 unknown_model" in capsys.readouterr().err
