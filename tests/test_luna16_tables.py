"""LUNA16's tables follow one set of rules in every reader (BOM, CRLF, header-only, duplicate and malformed uids),
and every error names the file and the row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from custom_components.errors import InputError
from custom_components.luna16_tables import (
    read_annotations,
    read_seriesuids,
    read_submission,
    write_submission,
)

UID_A = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100"
UID_B = "1.3.6.1.4.1.14519.5.2.1.6279.6001.200"
HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm"


def _write(path: Path, text: str, bom: bool = False, crlf: bool = False) -> Path:
    text = text.replace("\n", "\r\n") if crlf else text
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("crlf", [False, True])
def test_every_table_reads_the_same_with_bom_and_crlf(tmp_path: Path, bom: bool, crlf: bool):
    ann = _write(tmp_path / "a.csv", f"{HEADER}\n{UID_A},1,2,3,4\n", bom, crlf)
    uids = _write(tmp_path / "u.csv", f"{UID_A}\n{UID_B}\n", bom, crlf)
    sub = _write(tmp_path / "s.csv", f"seriesuid,coordX,coordY,coordZ,probability\n{UID_B},1,2,3,0.5\n", bom, crlf)
    np.testing.assert_array_equal(read_annotations(ann)[UID_A], [[1, 2, 3, 4]])
    assert read_seriesuids(uids) == [UID_A, UID_B]
    np.testing.assert_array_equal(read_submission(sub)[UID_B], [[1, 2, 3, 0.5]])


def test_header_only_tables_are_empty_and_an_empty_uid_list_is_an_error(tmp_path: Path):
    assert read_annotations(_write(tmp_path / "a.csv", HEADER + "\n")) == {}
    assert read_submission(_write(tmp_path / "s.csv", "seriesuid,coordX,coordY,coordZ,probability\n")) == {}
    with pytest.raises(InputError, match=r"u\.csv: no seriesuid listed"):
        read_seriesuids(_write(tmp_path / "u.csv", "seriesuid\n"))


def test_duplicate_and_malformed_uids_name_the_row(tmp_path: Path):
    with pytest.raises(InputError, match=rf"u\.csv: row 3: seriesuid {UID_A} is already listed at row 1"):
        read_seriesuids(_write(tmp_path / "u.csv", f"{UID_A}\n{UID_B}\n{UID_A}\n"))
    with pytest.raises(InputError, match=r"v\.csv: row 2: 'scan 2' is not a seriesuid"):
        read_seriesuids(_write(tmp_path / "v.csv", f"{UID_A}\nscan 2\n"))


def test_annotation_errors_name_file_and_row(tmp_path: Path):
    path = _write(tmp_path / "annotations.csv", "seriesuid,coordX,coordY,diameter_mm\n1.2.3,1,2,3\n")
    with pytest.raises(InputError, match=r"annotations\.csv: missing column\(s\) coordZ"):
        read_annotations(path)
    _write(path, HEADER + "\n1.2.3,1,2,3,4\n1.2.3,1,abc,3,4\n")
    with pytest.raises(InputError, match=r"annotations\.csv: row 3: coordY is 'abc', not a finite number"):
        read_annotations(path)
    _write(path, HEADER + "\n1.2.3,1,2,3,-1\n")
    with pytest.raises(InputError, match=r"annotations\.csv: row 2: diameter_mm is -1, must be > 0"):
        read_annotations(path)
    np.testing.assert_array_equal(read_annotations(path, excluded=True)["1.2.3"], [[1, 2, 3, -1]])
    _write(path, "")
    with pytest.raises(InputError, match=r"annotations\.csv: empty file"):
        read_annotations(path)
    with pytest.raises(InputError, match=r"missing\.csv: file not found"):
        read_annotations(tmp_path / "missing.csv")


def test_a_written_submission_reads_back(tmp_path: Path):
    marks = {UID_A: np.array([[1.0, 2.0, 3.0, 0.25], [4.0, 5.0, 6.0, 0.75]])}
    back = read_submission(write_submission(marks, tmp_path / "s.csv"))
    np.testing.assert_allclose(back[UID_A], marks[UID_A][::-1])
