"""Fast checks of the search commands and pure parts: help without heavy imports, the gate's arithmetic."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bitray.cli import main
from bitray.errors import BitrayError

COMMANDS = ("index", "search", "duplicates", "evaluate")


def test_help_lists_the_search_commands_without_importing_tensorflow_or_faiss():
    code = (
        "import sys; from bitray.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('tensorflow', 'ray', 'faiss', 'sklearn') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in COMMANDS:
        assert f"\n    {command} " in out
    assert out.strip().endswith("[]")


@pytest.mark.parametrize("command", COMMANDS)
def test_each_search_command_has_help(command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0


def test_search_needs_one_query(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--index", "x", "--image", "a.jpg", "--path", "b.jpg"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_index_of_an_output_without_finished_runs_is_a_clear_error(tmp_path, capsys):
    assert main(["index", "--embeddings", str(tmp_path)]) == 2
    assert "holds no finished embedding run" in capsys.readouterr().err


def test_gate_fails_on_any_metric_worse_by_more_than_the_tolerance():
    from bitray.search.evaluate import Evaluation, format_table, gate

    def evaluation(**metrics: float) -> Evaluation:
        return Evaluation("out", "m@x", 10, 2, 0, 5, metrics)

    base = evaluation(knn_top1_k1=0.80, linear_top1=0.90)
    passed, rows = gate(evaluation(knn_top1_k1=0.95, linear_top1=0.895), base, 0.01)
    assert passed and [round(r.delta, 3) for r in rows] == [0.15, -0.005]
    passed, _ = gate(evaluation(knn_top1_k1=0.95, linear_top1=0.85), base, 0.01)
    assert not passed
    table = format_table(evaluation(knn_top1_k1=0.95, linear_top1=0.85), base, 0.01)
    assert "gate: FAIL" in table and "WORSE" in table.splitlines()[-2]


def test_duplicate_components_are_transitive():
    from bitray.search.duplicates import _components

    assert sorted(_components([(0, 1), (1, 2), (5, 6)])) == [[0, 1, 2], [5, 6]]
    assert _components([]) == []


def test_equal_etags_mean_equal_bytes_on_s3_only():
    """A gs:// row's etag is its generation: two objects may share one and still differ."""
    from bitray.search.duplicates import _same_bytes

    class Digests:  # what reading each object would give
        def digest(self, uri: str) -> str | None:
            return {"gs://b/a": "1", "gs://b/c": "2"}.get(uri)

    assert not _same_bytes(0, 1, ["gs://b/a", "gs://b/c"], ["17", "17"], [4, 4], Digests())
    assert _same_bytes(0, 1, ["s3://b/a", "s3://b/c"], ["md5", "md5"], [4, 4], Digests())


def test_normalise_keeps_zero_rows_zero():
    from bitray.search.vectors import normalise

    out = normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_contact_sheet_geometry_and_missing_images(tmp_path):
    from PIL import Image

    from bitray.search.sheet import SheetItem, SheetLayout, contact_sheet, write_png

    layout = SheetLayout(thumb=40, caption=30, pad=4, columns=3)
    assert layout.size(1) == (48, 78) and layout.size(4) == (136, 152)
    assert layout.image_box(4, (40, 20)) == (48, 88, 88, 108)
    sheet = contact_sheet([SheetItem(str(tmp_path / "gone.jpg"), "0.900")], layout)
    assert sheet.size == (48, 78) and sheet.getpixel((10, 30)) != (255, 255, 255)
    with pytest.raises(BitrayError, match=r"give a \.png"):
        write_png(sheet, str(tmp_path / "sheet.jpg"))
    write_png(sheet, str(tmp_path / "sheet.png"))
    assert Image.open(tmp_path / "sheet.png").size == (48, 78)
