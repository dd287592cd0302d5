"""Text id files: lines end at ``\\n`` or ``\\r\\n`` only, a UTF-8 BOM is dropped, blank lines are skipped; and
ids that differ only in Unicode normalisation are kept with a warning."""

from __future__ import annotations

import unicodedata
import warnings
from pathlib import Path

import pytest

import daunce_store
from daunce_store.errors import IdNormalizationWarning, InvalidInputError
from daunce_store.store import read_ids, validate_ids

NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")


def _ids(tmp_path: Path, data: bytes) -> list[str]:
    path = tmp_path / "ids.txt"
    path.write_bytes(data)
    return read_ids(path).tolist()


@pytest.mark.parametrize(
    ("inside", "name"),
    [("\u2028", "LINE SEPARATOR"), ("\u2029", "PARAGRAPH SEPARATOR"), ("\x85", "NEL"), ("\x0c", "form feed"),
     ("\x0b", "vertical tab"), ("\x1c", "file separator"), ("\x1d", "group separator"), ("\x1e", "record separator")],
)
def test_other_line_breaks_are_part_of_the_id(tmp_path: Path, inside: str, name: str) -> None:
    """str.splitlines would cut ``a<break>b`` in two ids; only \\n (and \\r\\n) end a line."""
    assert _ids(tmp_path, f"a{inside}b\nc\n".encode()) == [f"a{inside}b", "c"], name


def test_lf_and_crlf_end_lines(tmp_path: Path) -> None:
    assert _ids(tmp_path, b"a\r\nb\nc\r\n") == ["a", "b", "c"]
    assert _ids(tmp_path, b"a\r\nb") == ["a", "b"]  # no newline at the end: the last line still counts


def test_a_lone_carriage_return_is_refused(tmp_path: Path) -> None:
    """Classic Mac line ends (or a stray CR): not silently one id, nor silently a line break."""
    with pytest.raises(InvalidInputError, match=r"line 2 holds a carriage return"):
        _ids(tmp_path, b"a\nb\rc\n")


def test_a_utf8_bom_is_dropped(tmp_path: Path) -> None:
    assert _ids(tmp_path, "\ufeffa\nb\n".encode()) == ["a", "b"]
    assert _ids(tmp_path, "\ufeffa\r\nb\r\n".encode()) == ["a", "b"]  # Notepad's "UTF-8 with BOM", CRLF
    assert _ids(tmp_path, "a\n\ufeffb\n".encode()) == ["a", "\ufeffb"]  # only a leading one is a BOM


def test_blank_lines_and_the_trailing_newline_as_before(tmp_path: Path) -> None:
    assert _ids(tmp_path, b"a\n\nb\n   \n\r\nc\n\n") == ["a", "b", "c"]
    assert _ids(tmp_path, " a \n\tb\n".encode()) == [" a ", "\tb"]  # spaces inside a line are the id's own
    assert _ids(tmp_path, "a\n\u2028\n\x0c\nb\n".encode()) == ["a", "b"]  # a line of only breaks is blank


def test_a_store_from_a_text_file_keeps_the_ids(tmp_path: Path) -> None:
    (tmp_path / "ids.txt").write_bytes("\ufeffx\u2028y\r\nz\x85w\n".encode())
    s = daunce_store.init(tmp_path / "s.zarr", read_ids(tmp_path / "ids.txt"))
    assert daunce_store.open(tmp_path / "s.zarr", mode="r").train_ids.tolist() == ["x\u2028y", "z\x85w"]
    assert s.n_train == 2


def test_ids_differing_only_in_normalisation_warn_naming_both() -> None:
    with pytest.warns(IdNormalizationWarning) as caught:
        out = validate_ids(["a", NFC, "b", NFD], what="train ids")
    assert out.tolist() == ["a", NFC, "b", NFD]  # a warning, not an error: both kept
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("train ids: ") and f"{NFC!r} (row 1, NFC) and {NFD!r} (row 3, NFD)" in message


def test_an_ascii_id_and_its_canonical_lookalike_warn() -> None:
    """KELVIN SIGN (U+212A) is canonically a plain K: its NFC is ASCII."""
    with pytest.warns(IdNormalizationWarning, match=r"'K' \(row 1, NFC\) and '\u212a' \(row 2, neither NFC nor NFD\)"):
        validate_ids(["x", "K", "\u212a"])


def test_no_warning_for_distinct_or_single_form_ids() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_ids([NFC, "cafe", "CAFÉ", "ﬁ", "fi"])  # compatibility forms (ligature ﬁ) are different text
        validate_ids([NFD, "x"])
        validate_ids([NFC, NFD], check_normalization=False)


def test_init_and_add_query_set_warn(tmp_path: Path) -> None:
    with pytest.warns(IdNormalizationWarning, match="train ids"):
        s = daunce_store.init(tmp_path / "s.zarr", [NFC, NFD, "t"])
    assert s.train_ids.tolist() == [NFC, NFD, "t"]
    with pytest.warns(IdNormalizationWarning, match="query set 'more' ids"):
        s.add_query_set("more", [NFD, NFC])
    assert s.query_ids("more").tolist() == [NFD, NFC]


def test_read_ids_leaves_the_warning_to_the_store(tmp_path: Path) -> None:
    """The CLI reads a file, then creates the store: one warning, from the store, not two."""
    (tmp_path / "ids.txt").write_text(f"{NFC}\n{NFD}\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_ids(tmp_path / "ids.txt").tolist() == [NFC, NFD]


def test_many_pairs_are_summarised() -> None:
    pairs = [(unicodedata.normalize("NFC", f"é{i}"), unicodedata.normalize("NFD", f"é{i}")) for i in range(5)]
    with pytest.warns(IdNormalizationWarning, match="and 2 more pairs"):
        validate_ids([x for pair in pairs for x in pair])


def test_ids_holding_a_line_break_are_refused(tmp_path) -> None:
    """An id from a CSV cell may hold a line break; id files, `select --ids-output` and the text tables are one
    id a line, so such an id would come back as two. Refused at init, naming it, and nothing is written."""
    import daunce_store
    from daunce_store import errors

    for bad in ("a\nx", "b\r\ny", "c\rz"):
        with pytest.raises(errors.InvalidInputError, match="one line of text.*line break"):
            daunce_store.init(tmp_path / "s.zarr", ["t0", bad, "t2"])
        assert not (tmp_path / "s.zarr").exists()
