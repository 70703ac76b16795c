"""Dynamic prompts: `{red|blue}` variants and `__name__` wildcards, per image, as the webui's
Dynamic Prompts extension (sd-dynamic-prompts) expands them, with the same `dynamicprompts` library.

What the extension does, and so Darkroom:
- Styles are applied first (darkroom/text/styles.py), then the text is expanded: a style may
  hold variants or wildcards. The expansion happens before the webui's own prompt syntax is
  read; that syntax (`[from:to:when]`, `[a|b]`, `(word:1.2)`, `<lora:name:0.8>`, `AND`,
  `BREAK`) passes through untouched, except that `|` inside a `{...}` variant always separates
  its options and `#` starts a comment to the end of the line.
- Random mode: image k's prompt is drawn with seed + k (its image seed), so the same request
  gives the same prompts. With a variation seed (subseed strength > 0) every image gets image
  0's prompt, since the variations are meant to differ only by their noise.
- Combinatorial mode: one image per combination, in order, image k with seed + k; the
  batch count becomes what the combinations need (the last batch may be smaller). A
  `{...}`/`__...__` negative prompt is crossed with the prompt's combinations.
- Wildcard files: `name.txt` (one value a line, `#` comments), `.json` or `.yaml` in the
  Darkroom home's `wildcards/` and, in place, an A1111/Forge install's
  `extensions/sd-dynamic-prompts/wildcards` (Home.wildcard_dirs); `__sub/name__` reads a
  subfolder, `__name*__` globs. A wildcard with no file is an error naming the folders.
- The infotext records each image's expanded prompt, so rerunning an image (--from-png)
  needs neither the template nor the wildcard files.
Text without `{` or a `__...__` pair is never handed to the parser, so a prompt that uses no
dynamic syntax is sent exactly as written.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import pyparsing
from dynamicprompts.commands.base import Command
from dynamicprompts.commands.wildcard_command import WildcardCommand
from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
from dynamicprompts.parser.config import ParserConfig
from dynamicprompts.parser.parse import parse
from dynamicprompts.wildcards import WildcardManager

from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.request import GenerationRequest
from darkroom.text.styles import StyleLibrary

# The extension's defaults (its settings dp_parser_variant_start/_end, dp_parser_wildcard_wrap).
# Braces, not the webui's square brackets, so `[a|b]` alternation and `[from:to:when]` stay the webui's.
PARSER = ParserConfig(variant_start="{", variant_end="}", wildcard_wrap="__")
_WILDCARD = re.compile(r"__[^\n]+?__")


def has_syntax(text: str) -> bool:
    """Whether `text` uses dynamic-prompt syntax at all (else it is left exactly as written)."""
    return "{" in text or bool(_WILDCARD.search(text))


class MissingWildcard(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _StrictWildcards(WildcardManager):
    """The library's manager, except that a wildcard with no file raises (the library would keep
    `__name__` in the prompt as text, drawing something the user did not ask for)."""

    def get_values(self, wildcard: str):
        values = super().get_values(wildcard)
        if len(values) == 0:
            raise MissingWildcard(wildcard)
        return values


class WildcardLibrary:
    """The wildcard folders of a Home, read afresh for each request (edits apply at once)."""

    def __init__(self, home: Home):
        self.home = home

    def dirs(self) -> list[Path]:
        return self.home.wildcard_dirs()

    def manager(self) -> WildcardManager:
        roots = [d for d in self.dirs() if d.is_dir()]
        return _StrictWildcards(root_map={"": roots}, wildcard_wrap=PARSER.wildcard_wrap)

    def names(self) -> list[str]:
        """Every `__name__` there is, sorted."""
        return sorted(self.manager().get_collection_names())

    def missing(self, name: str) -> InvalidRequest:
        names = self.names()
        there = (f"the wildcards there are: {', '.join(names[:30])}{' ...' if len(names) > 30 else ''}" if names
                 else "there are none")
        folders = ", ".join(str(d) for d in self.dirs())
        return InvalidRequest(f"no wildcard file for __{name}__: put {name}.txt (one value a line) in {folders};"
                              f" {there}")


def _syntax_error(what: str, text: str, error: pyparsing.ParseBaseException) -> InvalidRequest:
    near = text[max(0, error.loc - 15):error.loc + 15]
    return InvalidRequest(f"the {what}'s dynamic-prompt syntax ({{a|b}} variants, __name__ wildcards) does not parse"
                          f" at character {error.loc + 1} (near {near!r}): {error.msg}; close every {{ and __, or set"
                          " dynamic_prompts false (CLI --no-dynamic-prompts) to send the text as written")


def _wildcard_names(command: object) -> Iterator[str]:
    """The plain `__name__`s a parsed template refers to directly (those inside files are checked when read)."""
    if isinstance(command, WildcardCommand) and isinstance(command.wildcard, str):
        yield command.wildcard
    if dataclasses.is_dataclass(command):
        for f in dataclasses.fields(command):
            yield from _wildcard_names(getattr(command, f.name))
    elif isinstance(command, (list, tuple)):
        for item in command:
            yield from _wildcard_names(item)
    elif isinstance(command, dict):
        for item in command.values():
            yield from _wildcard_names(item)


@dataclass(frozen=True)
class Chunk:
    """Images first..first+count-1 of one batch, which share one prompt and so are sampled together."""

    batch: int
    first: int
    count: int
    request: GenerationRequest


@dataclass(frozen=True)
class PromptPlan:
    """A request's prompts per image: `request` is the one asked for, with its seeds fixed where the
    prompts depend on them and its batch count settled (combinatorial mode)."""

    request: GenerationRequest
    prompts: list[str]
    negatives: list[str]

    @property
    def uniform(self) -> bool:
        """One prompt for every image of the request: it runs as it is, batches and all."""
        return (len(set(zip(self.prompts, self.negatives, strict=True))) == 1
                and len(self.prompts) == self.request.image_count)

    def _expanded(self, prompt: str, negative: str, **update) -> GenerationRequest:
        return self.request.model_copy(update={"prompt": prompt, "negative_prompt": negative, "styles": [],
                                               "dynamic_prompts": False, "combinatorial": False, **update})

    def single(self) -> GenerationRequest:
        """The request to run when `uniform`: its text expanded, nothing left to expand."""
        return self._expanded(self.prompts[0], self.negatives[0])

    def chunks(self) -> list[Chunk]:
        """Each batch split into runs of images with the same prompts, each run its own request (image k keeps
        seed + k and subseed + k: a batch of N gives the pixels of N single runs, so splitting changes none)."""
        req, size, out = self.request, self.request.batch_size, []
        for batch in range(math.ceil(len(self.prompts) / size)):
            first = batch * size
            end = min(first + size, len(self.prompts))
            while first < end:
                key = (self.prompts[first], self.negatives[first])
                count = 1
                while first + count < end and (self.prompts[first + count], self.negatives[first + count]) == key:
                    count += 1
                subseed = req.subseed + first if req.subseed != -1 else -1
                out.append(Chunk(batch, first, count, self._expanded(
                    *key, seed=req.seed + first, subseed=subseed, batch_size=count, n_iter=1)))
                first += count
        return out

    def restore(self, done: GenerationRequest) -> GenerationRequest:
        """A finished run's request (sizes and preset settled) with the template, styles and seeds asked for."""
        req = self.request
        return done.model_copy(update={
            "prompt": req.prompt, "negative_prompt": req.negative_prompt, "styles": list(req.styles),
            "dynamic_prompts": req.dynamic_prompts, "combinatorial": req.combinatorial, "seed": req.seed,
            "subseed": req.subseed, "batch_size": req.batch_size, "n_iter": req.n_iter})


class PromptPlanner:
    """Styles, then dynamic prompts: the text each image of a request is generated from."""

    def __init__(self, home: Home):
        self.styles = StyleLibrary(home)
        self.wildcards = WildcardLibrary(home)

    def _styled(self, req: GenerationRequest) -> tuple[str, str]:
        return self.styles.apply(req.prompt, req.negative_prompt, list(req.styles))

    def _dynamic(self, req: GenerationRequest, texts: tuple[str, str]) -> bool:
        return req.dynamic_prompts and any(has_syntax(t) for t in texts)

    def check(self, req: GenerationRequest) -> None:
        """Refuse, before anything runs, unknown styles, dynamic syntax that does not parse and wildcards
        the template names directly that have no file."""
        texts = self._styled(req)
        if not self._dynamic(req, texts):
            return
        manager = self.wildcards.manager()
        for what, text in zip(("prompt", "negative prompt"), texts, strict=True):
            if not has_syntax(text):
                continue
            try:
                tree: Command = parse(text, parser_config=PARSER)
            except pyparsing.ParseBaseException as e:
                raise _syntax_error(what, text, e) from None
            for name in _wildcard_names(tree):
                try:
                    manager.get_values(name)
                except MissingWildcard:
                    raise self.wildcards.missing(name) from None

    def plan(self, req: GenerationRequest, *, max_images: int, random_seed: Callable[[], int]) -> PromptPlan:
        """Each image's (prompt, negative prompt); `max_images` bounds combinatorial mode, `random_seed`
        fixes a seed of -1 when the prompts depend on it."""
        prompt, negative = self._styled(req)
        if not self._dynamic(req, (prompt, negative)):
            n = req.image_count
            return PromptPlan(req, [prompt] * n, [negative] * n)
        self.check(req)
        fixed = {"seed": random_seed() if req.seed == -1 else req.seed}
        if req.subseed_strength > 0 and req.subseed == -1:
            fixed["subseed"] = random_seed()
        req = req.model_copy(update=fixed)
        try:
            if req.combinatorial:
                prompts, negatives = self._combinations(prompt, negative, max_images)
                req = req.model_copy(update={"n_iter": math.ceil(len(prompts) / req.batch_size)})
            else:
                prompts, negatives = self._random(req, prompt, negative)
        except MissingWildcard as e:
            raise self.wildcards.missing(e.name) from None
        except RecursionError:
            raise InvalidRequest("the wildcard files refer to each other in a loop (a file that names itself,"
                                 f" directly or through others); check the files in {self.wildcards.dirs()[0]}"
                                 ) from None
        except pyparsing.ParseBaseException as e:  # a wildcard file's line that does not parse
            raise InvalidRequest(f"a wildcard value does not parse as dynamic-prompt syntax: {e.msg} in {e.line!r}"
                                 ) from None
        return PromptPlan(req, prompts, negatives)

    def _random(self, req: GenerationRequest, prompt: str, negative: str) -> tuple[list[str], list[str]]:
        n = req.image_count
        seeds = [req.seed] * n if req.subseed_strength > 0 else [req.seed + k for k in range(n)]
        generator = RandomPromptGenerator(self.wildcards.manager(), parser_config=PARSER)

        def draw(text: str) -> list[str]:
            return generator.generate(text, n, seeds=seeds) if has_syntax(text) else [text] * n

        return draw(prompt), draw(negative)

    def _combinations(self, prompt: str, negative: str, max_images: int) -> tuple[list[str], list[str]]:
        generator = CombinatorialPromptGenerator(self.wildcards.manager(), parser_config=PARSER)

        def every(text: str) -> list[str]:
            return generator.generate(text, max_prompts=max_images + 1) if has_syntax(text) else [text]

        pairs = list(product(every(prompt) or [""], every(negative) or [""]))
        if len(pairs) > max_images:
            raise InvalidRequest(f"the prompts have more than {max_images} combinations, more than the batch count"
                                 " limit allows at this batch size; use fewer options, a larger batch size, or"
                                 " random mode (combinatorial false)")
        return [p for p, _ in pairs], [n for _, n in pairs]
