#!/usr/bin/env python3
"""Turns the reStructuredText sources of the Python documentation (Debian's
`python3.11-doc` package: `usr/share/doc/python3.11/html/_sources/`, PSF
License Agreement) into parquet shards in FineWeb-Edu's ten-column schema.

Each source file becomes plain prose: code removed (literal blocks after
`::`, the bodies of `code-block`, `doctest`, `testcode`, `productionlist`,
`parsed-literal`, `literalinclude` ..., `>>>` sessions), tables dropped,
comments, targets, `index`, `module`, `toctree` and similar directives
dropped, admonitions (`note`, `seealso`, ...) reduced to their prose,
API descriptions (`.. function:: abs(x)`) kept as their signature line and
prose, `versionadded`/`versionchanged`/`deprecated` rendered as Sphinx
renders them ("New in version 3.2."), roles (:func:`os.path.join`,
:ref:`text <label>`) turned into their text (as Sphinx shows it: `os.path.join()`,
`text`, a bare :ref:`label` as the title it points at), inline markup
(``**``, ``*``, double backquotes) stripped, section titles kept as their
own paragraph without their adornment lines. Paragraphs are separated by
blank lines, whitespace inside a paragraph collapsed.

A file is split into documents at its top two section levels (the page
title and its sections), and a section shorter than --min-chars is merged
into the one before it (the first into the one after it), so documents
are page-sized and little text is lost; a file whose whole text is shorter
than --min-chars is dropped.

Usage: python_docs_to_fineweb.py PKG_ROOT OUT_DIR --package-version V
                                 [--token-counts TOKENIZER_JSON] [--licences]

PKG_ROOT is where the .deb was extracted (`dpkg-deb -x`). With
--token-counts, `token_count` is the document's token count under that
tokenizer (needs the `tokenizers` package); otherwise 0. --licences also
writes the licence files (from the package) to OUT_DIR; --dump-text DIR
writes each document as a .txt file, for reading by eye.
"""
import argparse
import html.parser
import pathlib
import re
import sys
import unicodedata

from fineweb_schema import fineweb_row, write_shards

SOURCES = "usr/share/doc/python3.11/html/_sources"
HTML = "usr/share/doc/python3.11/html"
# Not prose: legal text (shipped as the licence files instead), the table
# of contents, and a fragment that other pages include.
SKIP_FILES = {"license", "copyright", "contents"}
SKIP_DIRS = {"includes"}

RELEASE = "3.11.2"
VERSION = "3.11"

# Directives dropped with their whole body: code, tables, indexing and
# page plumbing.
DROP = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testsetup",
    "testoutput", "testcleanup", "productionlist", "literalinclude",
    "parsed-literal", "highlight", "index", "toctree", "tabularcolumns",
    "sectionauthor", "moduleauthor", "codeauthor", "include", "image", "figure",
    "raw", "list-table", "table", "csv-table", "contents", "limited-api-list",
    "audit-event-table", "miscnews", "audit-event", "currentmodule", "module",
    "program", "availability", "default-role", "role", "math", "graphviz",
    "literal-block", "c:namespace", "c:namespace-push", "c:namespace-pop",
    "py:module", "py:currentmodule", "opcode-table",
}
# API descriptions: the signature line(s) stay as a paragraph each, the
# options go, the body (prose) stays.
SIGNATURE = {
    "function", "method", "class", "attribute", "data", "exception",
    "decorator", "decoratormethod", "classmethod", "staticmethod",
    "coroutinemethod", "coroutinefunction", "abstractmethod",
    "awaitablefunction", "awaitablemethod", "property", "type",
    "c:function", "c:member", "c:type", "c:var", "c:macro", "c:struct",
    "c:union", "c:enum", "c:enumerator", "c:data", "cmdoption", "option",
    "envvar", "opcode", "pdbcommand", "describe", "object", "2to3fixer",
    "py:function", "py:method", "py:class", "py:attribute", "py:data",
    "py:exception", "py:decorator", "py:classmethod", "py:staticmethod",
}
# What Sphinx shows before a signature.
SIGNATURE_PREFIX = {
    "class": "class ", "exception": "exception ", "classmethod": "classmethod ",
    "staticmethod": "static ", "coroutinefunction": "coroutine ",
    "coroutinemethod": "coroutine ", "abstractmethod": "abstractmethod ",
    "decorator": "@", "decoratormethod": "@", "awaitablefunction": "awaitable ",
    "awaitablemethod": "awaitable ",
}
# Titled containers whose argument is a heading worth keeping.
TITLED = {"topic", "sidebar", "rubric", "admonition"}
VERSION_DIRECTIVES = {
    "versionadded": "New in version {v}",
    "versionchanged": "Changed in version {v}",
    "deprecated": "Deprecated since version {v}",
}
# Everything else (note, warning, seealso, important, caution,
# impl-detail, only, glossary, epigraph, ...): header dropped, prose kept.

ADORN = set("=-`:'\"~^_*+#<>.!$%&(),/;?@[\\]{|}")
DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([A-Za-z][\w:.+-]*)::(?:\s+(.*))?$")
TARGET = re.compile(r"^(\s*)\.\.\s+_([^:]|`[^`]*`)[^:]*:")
LABEL = re.compile(r"^\s*\.\.\s+_([^:`][^:]*|`[^`]*`):\s*$")
SUBST = re.compile(r"^(\s*)\.\.\s+\|([^|]+)\|\s+([\w:-]+)::\s*(.*)$")
FOOTNOTE = re.compile(r"^(\s*)\.\.\s+\[([^\]]+)\]\s*(.*)$")
BULLET = re.compile(r"^(\s*)([-*+\u2022])(\s+)(\S.*)$")
ENUM = re.compile(r"^(\s*)((?:\d+|#|[a-z])[.)]|\((?:\d+|#|[a-z])\))(\s+)(\S.*)$")
FIELD = re.compile(r"^(\s*):([A-Za-z][\w .-]*):(?:\s+(.*))?$")
SIMPLE_TABLE = re.compile(r"^\s*=+(\s+=+)+\s*$")
GRID_LINE = re.compile(r"^\s*[+|]")


def indent_of(line):
    return len(line) - len(line.lstrip(" "))


def is_adornment(line):
    s = line.rstrip()
    return len(s) >= 2 and s[0] in ADORN and s == s[0] * len(s)


# ---------------------------------------------------------------- inline


def make_id(text):
    """docutils' `make_id`: how Sphinx names a section's anchor."""
    s = unicodedata.normalize("NFKD", text.lower()).encode("ascii", "ignore").decode("ascii")
    s = re.sub(r"[^a-z0-9]+", "-", " ".join(s.split()))
    return re.sub(r"^[-0-9]+|-+$", "", s)


ROLE = re.compile(r"(?<![\w`]):((?:[A-Za-z][\w.+-]*:)?[A-Za-z][\w.+-]*):`((?:[^`\\]|\\.)+)`")
LITERAL = re.compile(r"``(.+?)``(?!`)")
PHRASE_REF = re.compile(r"`((?:[^`\\]|\\.)+?)`__?(?![\w])")
INTERPRETED = re.compile(r"(?<![\w`])`((?:[^`\\]|\\.)+?)`(?![\w`])")
STRONG = re.compile(r"(?<![\w*\\])\*\*(?=\S)(.+?)(?<=[^\s\\])\*\*(?![\w*])")
EMPH = re.compile(r"(?<![\w*\\])\*(?=[^\s*])(.+?)(?<=[^\s\\*])\*(?![\w*])")
FOOTREF = re.compile(r"\s?\[(?:#[\w-]*|\d+|\*|[A-Za-z][\w-]*\d*)\]_(?![\w])")
SUBREF = re.compile(r"\|([^|\s][^|]*)\|(?:__?)?(?![\w])")
SIMPLE_REF = re.compile(r"(?<![\w_])([A-Za-z][A-Za-z0-9]*)_(?=[\s.,;:)!?]|$)")
TITLE_TARGET = re.compile(r"^(.*?)\s*<([^<>]+)>$", re.S)

FUNC_ROLES = {"func", "meth", "py:func", "py:meth", "c:func"}


class Inline:
    """Renders reST inline markup as the text Sphinx shows."""

    def __init__(self, labels, doc_titles):
        self.labels = labels          # ref label -> section title text
        self.doc_titles = doc_titles  # doc path -> page title text
        self.subst = {}
        self.current_doc = ""

    def role(self, name, content):
        content = content.replace("\\`", "`")
        m = TITLE_TARGET.match(content)
        explicit = m is not None and name not in {"abbr"}
        if explicit:
            title, target = m.group(1), m.group(2)
        else:
            title, target = content, content
        if name in {"ref", "std:ref"}:
            if explicit:
                return title
            return self.labels.get(target.lower(), target)
        if name == "doc":
            if explicit:
                return title
            path = target
            if not path.startswith("/"):
                base = self.current_doc.rsplit("/", 1)[0] if "/" in self.current_doc else ""
                path = f"{base}/{path}" if base else path
            path = path.lstrip("/")
            return self.doc_titles.get(path, target)
        if name in {"pep", "PEP"}:
            return title if explicit else f"PEP {content.split('#')[0]}"
        if name in {"rfc", "RFC"}:
            return title if explicit else f"RFC {content.split('#')[0]}"
        if name == "issue":
            return f"bpo-{content}"
        if name == "gh":
            return f"gh-{content}"
        if name == "abbr":
            return re.sub(r"\s*\(.*\)\s*$", "", content, flags=re.S)
        if name in {"samp", "file"}:
            return re.sub(r"(?<!\\)[{}]", "", content).replace("\\{", "{").replace("\\}", "}")
        if name == "menuselection":
            return content.replace("-->", "\u2023")
        if name == "kbd":
            return content
        if explicit:
            return title
        text = content
        if text.startswith("!"):
            text = text[1:]
        if text.startswith("~"):
            text = text[1:].rsplit(".", 1)[-1]
        if name in FUNC_ROLES and not text.endswith(")"):
            text += "()"
        return text

    def render(self, text):
        text = re.sub(r"\s+", " ", text)
        keep = []

        def stash(s):
            keep.append(s)
            return f"\x00{len(keep) - 1}\x00"

        text = LITERAL.sub(lambda m: stash(m.group(1)), text)
        text = ROLE.sub(lambda m: stash(self.role(m.group(1), m.group(2))), text)

        def subst(m):
            name = m.group(1)
            if name == "release":
                return stash(RELEASE)
            if name == "version":
                return stash(VERSION)
            if name in self.subst:
                return stash(self.subst[name])
            if name == "today":
                return ""
            return m.group(0)

        text = SUBREF.sub(subst, text)
        text = FOOTREF.sub("", text)

        def phrase(m):
            inner = m.group(1)
            t = TITLE_TARGET.match(inner)
            return stash(t.group(1) if t and t.group(1) else inner)

        text = PHRASE_REF.sub(phrase, text)
        text = INTERPRETED.sub(lambda m: stash(m.group(1)), text)
        text = STRONG.sub(lambda m: m.group(1), text)
        text = EMPH.sub(lambda m: m.group(1), text)
        text = SIMPLE_REF.sub(lambda m: m.group(1), text)
        # Escapes: a backslash-space is nothing, a backslash keeps the next char.
        text = re.sub(r"\\\s", "", text)
        text = re.sub(r"\\(.)", r"\1", text)
        for _ in range(8):  # stashed text can hold stashes (a role in a substitution)
            text = re.sub(r"\x00(\d+)\x00", lambda m: keep[int(m.group(1))], text)
        return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------- blocks


class Page:
    """The blocks of one source file: ("title", level, raw text, labels),
    ("para", raw text) and ("sig", signature)."""

    def __init__(self, lines):
        self.lines = [l.rstrip().expandtabs(8) for l in lines]
        self.blocks = []
        self.styles = []     # section adornment styles in order of first use
        self.subst_raw = {}  # substitution name -> raw replacement text
        self.labels = []     # labels waiting for the next title
        self.para = []       # raw lines of the paragraph being read
        self.para_col = None
        self.para_item = False   # that paragraph is a list item
        self.next_is_item = False
        self.literal_after = None  # text column of a paragraph that ended in "::"
        self.pending_prefix = None  # (text, indent) of a version directive
        self.parse()

    # -- paragraphs

    def flush(self):
        if not self.para:
            return
        raw = "\n".join(self.para)
        col = self.para_col
        self.para, self.para_col, self.para_item = [], None, False
        if raw.rstrip().endswith("::"):
            self.literal_after = col
        if self.pending_prefix is not None:
            prefix, k = self.pending_prefix
            self.pending_prefix = None
            if col > k:
                raw = f"{prefix}: {raw.lstrip()}"
            else:
                self.blocks.append(("para", prefix + "."))
        text = raw.strip()
        if text.endswith("::"):
            text = text[:-2]
            text = text.rstrip() if not text or text[-1].isspace() else text + ":"
        if text:
            self.blocks.append(("para", text))

    def drop_prefix(self):
        if self.pending_prefix is not None:
            self.blocks.append(("para", self.pending_prefix[0] + "."))
            self.pending_prefix = None

    def add_line(self, text, col):
        if self.para and col != self.para_col:
            self.flush()
        if not self.para:
            self.para_col = col
            self.para_item = self.next_is_item
            self.next_is_item = False
        self.para.append(text)

    # -- helpers

    def skip_block(self, i, k):
        """Index of the first line from i on that is non-blank and indented
        at most k: the end of an indented block."""
        n = len(self.lines)
        while i < n and (not self.lines[i].strip() or indent_of(self.lines[i]) > k):
            i += 1
        return i

    def header_lines(self, i, k):
        """Lines right after a directive line (before the first blank line
        or nested markup) indented more than k: argument continuations,
        options, or content that starts without a blank line."""
        out = []
        n = len(self.lines)
        while i < n and self.lines[i].strip() and indent_of(self.lines[i]) > k \
                and not self.lines[i].lstrip().startswith(".."):
            out.append(self.lines[i].strip())
            i += 1
        return out, i

    def title_level(self, char, over):
        style = (char, over)
        if style not in self.styles:
            self.styles.append(style)
        return self.styles.index(style) + 1

    def add_title(self, text, char, over):
        self.flush()
        self.drop_prefix()
        self.blocks.append(("title", self.title_level(char, over), text.strip(), self.labels))
        self.labels = []

    # -- the parser

    def parse(self):
        lines = self.lines
        n = len(lines)
        i = 0
        while i < n:
            line = lines[i]
            if not line.strip():
                self.flush()
                i += 1
                continue
            k = indent_of(line)
            s = line.strip()
            prev_blank = i == 0 or not lines[i - 1].strip()
            # A literal block after "::": everything indented deeper.
            if self.literal_after is not None and not self.para:
                lit, self.literal_after = self.literal_after, None
                if k > lit:
                    i = self.skip_block(i, lit)
                    continue
            # An interactive session (a doctest block): up to the next blank line.
            if s.startswith(">>>"):
                self.flush()
                while i < n and lines[i].strip():
                    i += 1
                continue
            # Section titles (at the left margin only): overlined ...
            if k == 0 and prev_blank and is_adornment(line) and i + 2 < n \
                    and lines[i + 1].strip() and not is_adornment(lines[i + 1]) \
                    and is_adornment(lines[i + 2]) and lines[i + 2].rstrip()[0] == s[0]:
                self.add_title(lines[i + 1], s[0], True)
                i += 3
                continue
            # ... or underlined.
            if k == 0 and not self.para and i + 1 < n and not is_adornment(line) \
                    and is_adornment(lines[i + 1]) and indent_of(lines[i + 1]) == 0 \
                    and len(lines[i + 1].rstrip()) >= min(len(s), 3):
                self.add_title(line, lines[i + 1].strip()[0], False)
                i += 2
                continue
            if is_adornment(line) and prev_blank and len(s) >= 4 and \
                    (i + 1 >= n or not lines[i + 1].strip()):
                i += 1  # a transition
                continue
            # Tables: simple ...
            if not self.para and SIMPLE_TABLE.match(line):
                j = i + 1
                while j < n:
                    if SIMPLE_TABLE.match(lines[j]) and (j + 1 >= n or not lines[j + 1].strip()):
                        j += 1
                        break
                    j += 1
                i = j
                continue
            # ... and grid tables.
            if not self.para and (s.startswith("+-") or s.startswith("+=")):
                j = i
                while j < n and lines[j].strip() and GRID_LINE.match(lines[j]):
                    j += 1
                i = j
                continue
            # Explicit markup.
            if s == ".." or s.startswith(".. "):
                self.flush()
                i = self.explicit(i, k, s)
                continue
            if s.startswith("__ ") or s == "__":
                self.flush()
                i = self.skip_block(i + 1, k)
                continue
            # Field lists: ":Author: A. N. Other" -> "Author: A. N. Other".
            m = FIELD.match(line)
            if m and not self.para:
                self.add_line(f"{m.group(2)}: {m.group(3) or ''}".strip(), k + 1)
                i += 1
                continue
            # List items: the marker goes, the item is read again as text
            # at its column (an enumerator only where a list can start:
            # after a blank line or another item, not inside a sentence).
            m = BULLET.match(line)
            if not m and (not self.para or self.para_item):
                m = ENUM.match(line)
            if m:
                self.flush()
                col = len(m.group(1)) + len(m.group(2)) + len(m.group(3))
                lines[i] = " " * col + m.group(4)
                self.next_is_item = True
                continue
            self.add_line(s, k)
            i += 1
        self.flush()
        self.drop_prefix()

    def explicit(self, i, k, s):
        """An explicit markup block at line i (indent k); returns the next
        line to read."""
        lines = self.lines
        line = lines[i]
        self.next_is_item = False
        if s == "..":
            if i + 1 < len(lines) and lines[i + 1].strip():
                return self.skip_block(i + 1, k)  # a comment on the next lines
            return i + 1  # an empty comment
        m = LABEL.match(line)
        if m:
            self.labels.append(m.group(1).strip("`").lower())
            return i + 1
        if TARGET.match(line):
            return self.skip_block(i + 1, k)
        m = SUBST.match(line)
        if m:
            name, kind, arg = m.group(2), m.group(3), m.group(4)
            more, j = self.header_lines(i + 1, k)
            if kind == "replace":
                self.subst_raw[name] = " ".join([arg] + more)
            elif kind == "unicode":
                self.subst_raw[name] = "".join(
                    chr(int(re.sub(r"^(0x|U\+|u)", "", x, flags=re.I), 16))
                    for x in arg.split() if re.match(r"^(0x|U\+|u)?[0-9A-Fa-f]+$", x, re.I))
            return self.skip_block(j, k)
        m = FOOTNOTE.match(line)
        if m:
            # A footnote's text is prose: a paragraph at the body's column.
            col = k + 3
            if m.group(3):
                self.add_line(m.group(3), col)
            more, j = self.header_lines(i + 1, k)
            for l in more:
                self.add_line(l, col)
            return j
        m = DIRECTIVE.match(line)
        if not m:
            return self.skip_block(i + 1, k)  # a comment
        name, arg = m.group(2).lower(), (m.group(3) or "").strip()
        head, j = self.header_lines(i + 1, k)
        args = [a for a in head if not FIELD.match(a)]
        if name in DROP:
            return self.skip_block(i + 1, k)
        if name in SIGNATURE:
            self.drop_prefix()
            prefix = SIGNATURE_PREFIX.get(name.split(":")[-1], "")
            sigs = []
            for sig in [arg] + args:
                if sigs and sigs[-1].endswith("\\"):
                    sigs[-1] = sigs[-1][:-1].rstrip() + " " + sig
                elif sig:
                    sigs.append(sig)
            for sig in sigs:
                self.blocks.append(("sig", prefix + sig.replace("\\*", "*")))
            return j
        col = k + 3
        if name in VERSION_DIRECTIVES or name == "deprecated-removed":
            words = " ".join([arg] + args).split(None, 2 if name == "deprecated-removed" else 1)
            if name == "deprecated-removed":
                v, removed = (words + ["", ""])[:2]
                prefix = f"Deprecated since version {v}, will be removed in version {removed}"
                text = words[2] if len(words) > 2 else ""
            else:
                prefix = VERSION_DIRECTIVES[name].format(v=words[0] if words else "")
                text = words[1] if len(words) > 1 else ""
            self.drop_prefix()
            if text:
                self.add_line(f"{prefix}: {text}", col)
            else:
                self.pending_prefix = (prefix, k)
            return j
        if name in TITLED:
            self.drop_prefix()
            if arg:
                self.blocks.append(("para", arg))
            return j
        # Admonitions and other containers: header gone, prose kept. Text on
        # the directive line (and the lines right after it) is content.
        if name == "only":
            return j
        for l in ([arg] if arg else []) + args:
            self.add_line(l, col)
        return j


# ---------------------------------------------------------------- documents


def collect(sources):
    """Pages of every source file, with the labels and page titles that
    :ref: and :doc: resolve to."""
    pages = {}
    for path in sorted(sources.rglob("*.rst.txt")):
        rel = path.relative_to(sources).as_posix()[: -len(".rst.txt")]
        if rel in SKIP_FILES or rel.split("/")[0] in SKIP_DIRS:
            continue
        pages[rel] = (path, Page(path.read_text(encoding="utf-8").splitlines()))
    return pages


def resolve_tables(pages):
    plain = Inline({}, {})
    labels, titles = {}, {}
    for rel, (_, page) in pages.items():
        plain.subst = {}
        first = True
        for b in page.blocks:
            if b[0] == "title":
                t = plain.render(b[2])
                for lab in b[3]:
                    labels[lab] = t
                if first:
                    titles[rel] = t
                    first = False
    return labels, titles


def documents(rel, page, inline, anchors, min_chars):
    """The documents of one page: (anchor or None, text)."""
    inline.current_doc = rel
    inline.subst = {}
    for name, raw in page.subst_raw.items():
        inline.subst[name] = inline.render(raw)
    titles = [inline.render(b[2]) for b in page.blocks if b[0] == "title" and b[1] <= 2]
    # Anchors: the built page's section ids where its sections match ours
    # one to one (they include docutils' numbered ids of duplicate titles),
    # else docutils' make_id of the title.
    if anchors is not None and len(anchors) != len(titles):
        print(f"{rel}: {len(titles)} sections here, {len(anchors)} in the HTML; "
              "anchors from the titles", file=sys.stderr)
        anchors = None
    if anchors is None:
        anchors = [make_id(t) for t in titles]
    chunks = []  # [anchor, [paragraphs]]
    seen_title = 0
    for b in page.blocks:
        if b[0] == "title":
            text = inline.render(b[2])
            if b[1] <= 2:
                chunks.append([anchors[seen_title] if seen_title else None, []])
                seen_title += 1
            if not chunks:
                chunks.append([None, []])
            chunks[-1][1].append(text)
        else:
            text = inline.render(b[1]) if b[0] == "para" else re.sub(r"\s+", " ", b[1]).strip()
            if not text:
                continue
            if not chunks:
                chunks.append([None, []])
            chunks[-1][1].append(text)
    chunks = [[a, "\n\n".join(p)] for a, p in chunks if p]
    # Merge short sections into their neighbour: backwards, the first forwards.
    merged = []
    for a, t in chunks:
        if merged and len(t) < min_chars:
            merged[-1][1] += "\n\n" + t
        else:
            merged.append([a, t])
    if len(merged) > 1 and len(merged[0][1]) < min_chars:
        first = merged.pop(0)
        merged[0] = [first[0], first[1] + "\n\n" + merged[0][1]]
    return [(a, t) for a, t in merged if len(t) >= min_chars]


class Sections(html.parser.HTMLParser):
    """The ids of a built page's `<section>` elements of depth 1 and 2, in
    order: the anchors of the page title and of its sections."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0
        self.ids = []

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.depth += 1
            if self.depth <= 2:
                self.ids.append(dict(attrs).get("id", ""))

    def handle_endtag(self, tag):
        if tag == "section":
            self.depth -= 1


def html_anchors(root, rel):
    p = root / HTML / f"{rel}.html"
    if not p.is_file():
        return None
    parser = Sections()
    parser.feed(p.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return parser.ids


def literal_section(lines, heading_start):
    """The dedented body of the `parsed-literal` under the heading that
    starts with `heading_start` in license.rst.txt, and that heading."""
    i = next(i for i, l in enumerate(lines) if l.startswith(heading_start))
    heading = lines[i].replace("|release|", RELEASE)
    j = next(j for j in range(i, len(lines)) if lines[j].strip() == ".. parsed-literal::")
    body = []
    for l in lines[j + 1:]:
        if l.strip() and indent_of(l) == 0:
            break
        body.append(l)
    width = min(indent_of(l) for l in body if l.strip())
    text = "\n".join(l[width:] for l in body).strip("\n").replace("|release|", RELEASE)
    return heading, text


def write_licences(pkg_root, out_dir, package_version):
    """LICENSE-PSF.txt and LICENSE-0BSD.txt from the documentation's own
    license.rst.txt and copyright.rst.txt, and Debian's copyright file as
    it is (COPYRIGHT-debian.txt)."""
    src = pkg_root / SOURCES
    lic = (src / "license.rst.txt").read_text(encoding="utf-8").splitlines()
    cop = (src / "copyright.rst.txt").read_text(encoding="utf-8")
    notices = [" ".join(p.split()) for p in cop.split("\n\n") if p.startswith("Copyright ")]
    terms_at = next(i for i, l in enumerate(lic) if l.startswith("Python software and documentation"))
    terms = []
    for l in lic[terms_at:]:
        if l.startswith("Some software incorporated"):
            break
        terms.append(l)
    terms = "\n".join(terms).strip()
    terms = re.sub(r":ref:`([^<`]*?)\s*<[^>]*>`", r"\1", terms)
    psf_heading, psf = literal_section(lic, "PSF LICENSE AGREEMENT FOR PYTHON")
    bsd_heading, bsd = literal_section(lic, "ZERO-CLAUSE BSD LICENSE FOR CODE")
    origin = (f"From the Debian package python3.11-doc {package_version}: "
              f"{SOURCES}/copyright.rst.txt and license.rst.txt (Python {RELEASE}).")
    (out_dir / "LICENSE-PSF.txt").write_text(
        f"Python {RELEASE} documentation: copyright notice and licence.\n{origin}\n\n"
        + "\n\n".join(notices) + "\n\n" + terms + "\n\n"
        + "Changes made (clause 3 below): the documentation's reStructuredText sources were\n"
        "converted to plain text for language-model training: code examples, interactive\n"
        "sessions, grammar productions, tables, comments and indexing markup removed,\n"
        "markup turned into its text, each page split into documents at its sections.\n"
        "The legal pages (copyright, license) and the table of contents are not included.\n"
        "See data/README.md and scripts/sample/python_docs_to_fineweb.py.\n\n"
        f"{psf_heading}\n{'-' * len(psf_heading)}\n\n{psf}\n", encoding="utf-8")
    (out_dir / "LICENSE-0BSD.txt").write_text(
        f"{origin}\n\n{bsd_heading}\n{'-' * len(bsd_heading)}\n\n{bsd}\n", encoding="utf-8")
    deb = pkg_root / "usr/share/doc/python3.11-doc/copyright"
    (out_dir / "COPYRIGHT-debian.txt").write_bytes(deb.read_bytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pkg_root", type=pathlib.Path)
    ap.add_argument("out_dir", type=pathlib.Path)
    ap.add_argument("--package-version", required=True)
    ap.add_argument("--token-counts", type=pathlib.Path)
    ap.add_argument("--rows-per-group", type=int, default=64)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--min-chars", type=int, default=500)
    ap.add_argument("--dump-text", type=pathlib.Path)
    ap.add_argument("--licences", action="store_true",
                    help="also write LICENSE-PSF.txt, LICENSE-0BSD.txt, COPYRIGHT-debian.txt to OUT_DIR")
    args = ap.parse_args()
    sources = args.pkg_root / SOURCES
    if not sources.is_dir():
        sys.exit(f"{sources}: not there (extract python3.11-doc with dpkg-deb -x)")
    tok = None
    if args.token_counts:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(args.token_counts))
    pages = collect(sources)
    labels, titles = resolve_tables(pages)
    inline = Inline(labels, titles)
    rows = []
    source_chars = 0
    dropped = []
    for rel, (path, page) in pages.items():
        source_chars += len(path.read_text(encoding="utf-8"))
        docs = documents(rel, page, inline, html_anchors(args.pkg_root, rel), args.min_chars)
        if not docs:
            dropped.append(rel)
        for anchor, text in docs:
            url = f"https://docs.python.org/{VERSION}/{rel}.html" + (f"#{anchor}" if anchor else "")
            rows.append(fineweb_row(
                text, url, f"python-{VERSION}-docs-debian-{args.package_version}",
                f"{SOURCES}/{rel}.rst.txt", tok))
            if args.dump_text:
                name = rel.replace("/", "__") + (f"__{anchor}" if anchor else "") + ".txt"
                args.dump_text.mkdir(parents=True, exist_ok=True)
                (args.dump_text / name).write_text(text + "\n", encoding="utf-8")
    urls = [r["url"] for r in rows]
    if len(set(urls)) != len(urls):
        dup = sorted({u for u in urls if urls.count(u) > 1})
        sys.exit(f"duplicate urls: {dup[:5]}")
    kept_chars = sum(len(r["text"]) for r in rows)
    print(f"{len(pages)} source files ({source_chars} characters) -> {len(rows)} documents "
          f"({kept_chars} characters, {100 * kept_chars / source_chars:.1f}% of the source); "
          f"{len(dropped)} files under {args.min_chars} characters dropped: {' '.join(dropped)}",
          file=sys.stderr)

    write_shards(rows, args.out_dir, args.files, args.rows_per_group)
    if args.licences:
        write_licences(args.pkg_root, args.out_dir, args.package_version)


if __name__ == "__main__":
    main()
