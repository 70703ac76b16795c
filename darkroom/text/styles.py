"""Prompt styles kept in the webui's `styles.csv`, read and written as AUTOMATIC1111 does.

The file (modules/styles.py in the webui): a CSV with a header row naming the columns `name`,
`prompt` (`text` in the oldest files) and `negative_prompt`; Forge and some tools add more
(e.g. `description`), which are read where known and always written back untouched. Read as
UTF-8 with an optional BOM, spaces after a comma skipped; a row whose name is empty or starts
with `#` is a comment. The webui writes UTF-8 with a BOM, CRLF line ends and minimal quoting.
With several files (`styles.csv`, `styles_integrated.csv`, other `styles*.csv`: Home.styles_files),
a later file's style wins a name, as in the webui's one dictionary.

Applying a style (the webui's merge_prompts): a `{prompt}` placeholder in the style's text is
replaced by the user's prompt; otherwise the style's text is appended with ", " (empty parts left
out). Styles apply in the order given, the negative prompt the same way. The image's infotext
records the prompt with the styles applied and no style names, as the webui does, so rerunning an
image needs no styles file.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from darkroom.errors import DarkroomError, InvalidRequest
from darkroom.fsutil import read_regular, write_atomic
from darkroom.home import Home

PLACEHOLDER = "{prompt}"
MAX_FILE_BYTES = 16 << 20
_BOM = "\ufeff"
_NEW_HEADER = ["name", "prompt", "negative_prompt"]


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""
    description: str = ""
    path: Path | None = field(default=None, compare=False)

    def as_a1111(self) -> dict[str, str]:
        """The webui API's PromptStyleItem (GET /sdapi/v1/prompt-styles)."""
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def merge_prompts(style_text: str, prompt: str) -> str:
    """One style's text merged into a prompt, as the webui does it."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, styles: list[Style]) -> tuple[str, str]:
    for style in styles:
        prompt = merge_prompts(style.prompt, prompt)
        negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


class StylesFile:
    """One styles CSV as it is on disk: header, every row (comments too), BOM and line ends, so a
    write changes the rows it means to and keeps the rest byte for byte where the CSV allows."""

    def __init__(self, path: Path):
        self.path = path
        self.bom, self.newline = True, "\r\n"  # a new file is written as the webui writes one
        self.header: list[str] = list(_NEW_HEADER)
        self.rows: list[list[str]] = []
        if path.exists():
            self._read()

    def _read(self) -> None:
        try:
            data = read_regular(self.path, what="a styles file", limit=MAX_FILE_BYTES)
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"styles file {self.path} is not UTF-8 (byte {e.start + 1}); save it as UTF-8"
                                 ) from None
        except OSError as e:
            raise DarkroomError(f"cannot read styles file {self.path}: {(e.strerror or str(e)).lower()}") from None
        self.bom = text.startswith(_BOM)
        text = text.removeprefix(_BOM)
        self.newline = "\r\n" if "\r\n" in text or "\n" not in text else "\n"
        try:
            table = [row for row in csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)]
        except csv.Error as e:
            raise InvalidRequest(f"styles file {self.path} is not a readable CSV: {e}") from None
        if not table:
            return
        self.header, self.rows = [h.strip() for h in table[0]], table[1:]
        if "name" not in self.header:
            raise InvalidRequest(f"styles file {self.path} has no 'name' column in its first row (the webui's"
                                 f" header is: {','.join(_NEW_HEADER)})")

    def _column(self, *names: str) -> int | None:
        return next((self.header.index(n) for n in names if n in self.header), None)

    def _cell(self, row: list[str], *names: str) -> str:
        i = self._column(*names)
        return row[i] if i is not None and i < len(row) else ""

    def _name(self, row: list[str]) -> str:
        return self._cell(row, "name")

    def styles(self) -> list[Style]:
        return [Style(self._name(r), self._cell(r, "prompt", "text"), self._cell(r, "negative_prompt"),
                      self._cell(r, "description"), self.path)
                for r in self.rows if r and self._name(r) and not self._name(r).startswith("#")]

    def put(self, style: Style) -> None:
        """Set `style`'s row (the last of that name, as that is the one the webui uses), or append it."""
        if style.description and "description" not in self.header:
            self.header.append("description")
        for column in ("prompt", "negative_prompt"):
            if self._column(column, "text" if column == "prompt" else column) is None:
                self.header.append(column)
        matches = [i for i, r in enumerate(self.rows) if r and self._name(r) == style.name]
        row = list(self.rows[matches[-1]]) if matches else []
        row += [""] * (len(self.header) - len(row))
        for value, names in ((style.name, ("name",)), (style.prompt, ("prompt", "text")),
                             (style.negative_prompt, ("negative_prompt",)), (style.description, ("description",))):
            i = self._column(*names)
            if i is not None:
                row[i] = value
        if matches:
            self.rows[matches[-1]] = row
        else:
            self.rows.append(row)

    def remove(self, name: str) -> bool:
        kept = [r for r in self.rows if not (r and self._name(r) == name)]
        removed = len(kept) != len(self.rows)
        self.rows = kept
        return removed

    def save(self) -> None:
        out = io.StringIO(newline="")
        writer = csv.writer(out, lineterminator=self.newline)  # minimal quoting, as the webui's DictWriter
        writer.writerow(self.header)
        writer.writerows(self.rows)
        text = (_BOM if self.bom else "") + out.getvalue()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, text.encode("utf-8"), doing=f"save styles to {self.path}")


class StyleLibrary:
    """The styles of a Home: its styles.csv and those of the A1111/Forge installs it uses in place."""

    def __init__(self, home: Home):
        self.home = home

    def files(self) -> list[Path]:
        return self.home.styles_files()

    def styles(self) -> dict[str, Style]:
        """By name, in file order; a later file's style replaces an earlier one of the same name."""
        out: dict[str, Style] = {}
        for path in self.files():
            for style in StylesFile(path).styles():
                out[style.name] = style
        return out

    def resolve(self, names: list[str]) -> list[Style]:
        """The styles named, in that order; an unknown name is an error listing the names there are."""
        if not names:
            return []
        known = self.styles()
        for name in names:
            if name not in known:
                raise InvalidRequest(self._unknown(name, known))
        return [known[n] for n in names]

    def apply(self, prompt: str, negative_prompt: str, names: list[str]) -> tuple[str, str]:
        return apply_styles(prompt, negative_prompt, self.resolve(names))

    def _unknown(self, name: str, known: dict[str, Style]) -> str:
        where = ", ".join(str(p) for p in self.files() if p.exists()) or str(self.home.styles_file)
        if not known:
            return (f"unknown style {name!r}: no styles are defined (add one with `darkroom styles add NAME PROMPT`"
                    f" or in {self.home.styles_file})")
        return f"unknown style {name!r}; the styles are: {', '.join(known)} (from {where})"

    def save(self, style: Style) -> Path:
        """Add or change a style in the file that holds it (the home's styles.csv for a new one)."""
        if not style.name.strip() or style.name.startswith("#"):
            raise InvalidRequest(f"style name {style.name!r} is not usable: give a name that is not empty and does"
                                 " not start with '#' (the webui reads such rows as comments)")
        current = self.styles().get(style.name)
        target = StylesFile(current.path if current and current.path else self.home.styles_file)
        target.put(style)
        target.save()
        return target.path

    def delete(self, name: str) -> list[Path]:
        """Remove a style from every file that holds it; returns those files."""
        changed = []
        for path in self.files():
            if not path.exists():
                continue
            table = StylesFile(path)
            if table.remove(name):
                table.save()
                changed.append(path)
        if not changed:
            raise InvalidRequest(self._unknown(name, self.styles()))
        return changed
