"""Plain-text corpora for ROME's key statistics (the second moment of MLP keys over text tokens).

    texts = load_texts("wikitext")          # local WikiText-2 (valid, test, train), detokenised
    texts = load_texts("wikipedia")         # local sample of Wikipedia pages, MediaWiki markup stripped
    texts = load_texts("hub:Salesforce/wikitext/wikitext-103-raw-v1:train")  # the hub (`datasets`)

``corpus="auto"`` takes the first local corpus found (wikitext, then wikipedia).  Every loader
returns a list of paragraphs in file order, so the same corpus and sample count always give the
same tokens (the statistics cache relies on that).
"""
from __future__ import annotations

import bz2
import functools
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from . import data_root

CORPORA = ("wikitext", "wikipedia")
WIKITEXT_DIR = Path("wikitext") / "wikitext-2"
WIKIPEDIA_DIR = Path("wikipedia-sample")


def _detok_wikitext(line: str) -> str:
    # The tokenised WikiText splits numbers and hyphens as " @-@ ", " @,@ ", " @.@ " and pads
    # punctuation with spaces; undo that so the model sees ordinary text.
    line = re.sub(r" @(.)@ ", r"\1", line)
    line = re.sub(r" ([.,;:!?)\]'])", r"\1", line)
    line = re.sub(r"([(\[]) ", r"\1", line)
    line = line.replace(" n't", "n't").replace(" 's", "'s")
    line = line.replace("<unk>", "unknown")
    return re.sub(r"\s+", " ", line).strip()


def wikitext_paragraphs(folder: Path) -> list[str]:
    out = []
    for name in ("valid.txt", "test.txt", "train.txt"):
        path = folder / name
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            if not stripped or (stripped.startswith("=") and stripped.endswith("=")):
                continue  # blank lines and "= = Heading = =" lines
            out.append(_detok_wikitext(stripped))
    return out


def _drop_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` spans (templates {{...}}, tables {|...|}), nested too."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def strip_mediawiki(markup: str) -> list[str]:
    """Paragraphs of readable text from MediaWiki markup (templates, tables, refs, files removed)."""
    text = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    # [[File:...]] / [[Category:...]] / interwiki links carry no prose; they may nest links.
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
                  "", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("&nbsp;", " ").replace("&amp;", "&").replace("&ndash;", "-").replace("&mdash;", "-")
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if (not line or line.startswith(("=", "*", "#", ":", ";", "|", "!", "__"))
                or line.upper().startswith("#REDIRECT")):
            continue
        line = re.sub(r"\s+", " ", line)
        if len(line.split()) >= 5:  # stray fragments of removed markup are short
            paragraphs.append(line)
    return paragraphs


def wikipedia_paragraphs(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.glob("*.bz2")):
        with bz2.open(path, "rb") as f:
            for _, elem in ET.iterparse(f):
                if elem.tag.endswith("}page") or elem.tag == "page":
                    ns = next((c.text for c in elem.iter() if c.tag.endswith("ns")), "0")
                    text = next((c.text for c in elem.iter() if c.tag.endswith("text")), None)
                    if ns == "0" and text:
                        out.extend(strip_mediawiki(text))
                    elem.clear()
    return out


def _hub_paragraphs(spec: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"corpus {spec!r} needs the `datasets` package (pip install datasets), "
                         f"or use a local corpus: {CORPORA}") from None
    parts = spec[len("hub:"):].split(":")
    path = parts[0].split("/")
    name = path[2] if len(path) > 2 else None
    split = parts[1] if len(parts) > 1 else "train"
    ds = datasets.load_dataset("/".join(path[:2]), name, split=split)
    return [t.strip() for t in ds["text"] if t and t.strip() and not t.strip().startswith("=")]


def _folder_stamp(folder: Path) -> tuple:
    """(name, size, mtime) of every file under ``folder``: a cache keyed by it re-reads a changed corpus."""
    if not folder.is_dir():
        return ()
    return tuple((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns)
                 for p in sorted(folder.rglob("*")) if p.is_file() for st in [p.stat()])


@functools.lru_cache(maxsize=8)
def _load(corpus: str, root: str | None, stamp: tuple = ()) -> tuple[str, ...]:
    if corpus.startswith("hub:"):
        return tuple(_hub_paragraphs(corpus))
    base = Path(root) if root else None
    if corpus == "wikitext" and base and (base / WIKITEXT_DIR).is_dir():
        return tuple(wikitext_paragraphs(base / WIKITEXT_DIR))
    if corpus == "wikipedia" and base and (base / WIKIPEDIA_DIR).is_dir():
        return tuple(wikipedia_paragraphs(base / WIKIPEDIA_DIR))
    raise ValueError(f"corpus {corpus!r} not found under data directory {root}; corpora: "
                     f"{CORPORA}, 'auto' or 'hub:<owner>/<dataset>[/<config>][:<split>]' (set KN_DATA_DIR)")


def resolve_corpus(corpus: str = "auto", data_dir=None) -> str:
    """The concrete corpus name ``auto`` stands for here (used in cache keys)."""
    if not isinstance(corpus, str) or not corpus:
        raise ValueError(f"corpus must be a name such as 'wikitext', got {corpus!r}")
    if corpus != "auto":
        if corpus not in CORPORA and not corpus.startswith("hub:"):
            raise ValueError(f"unknown corpus {corpus!r}; choose one of {CORPORA}, 'auto' or "
                             f"'hub:<owner>/<dataset>[/<config>][:<split>]'")
        return corpus
    root = data_root(data_dir)
    if root is not None:
        if (root / WIKITEXT_DIR).is_dir():
            return "wikitext"
        if (root / WIKIPEDIA_DIR).is_dir():
            return "wikipedia"
    return "hub:Salesforce/wikitext/wikitext-103-raw-v1:train"


def load_texts(corpus: str = "auto", data_dir=None) -> list[str]:
    """Paragraphs of ``corpus`` (see the module docstring), in a fixed order."""
    name = resolve_corpus(corpus, data_dir)
    root = data_root(data_dir)
    folder = {"wikitext": WIKITEXT_DIR, "wikipedia": WIKIPEDIA_DIR}.get(name)
    stamp = _folder_stamp(root / folder) if root is not None and folder is not None else ()
    return list(_load(name, str(root) if root else None, stamp))
