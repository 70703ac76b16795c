"""AUTOMATIC1111 scheduled prompts: `[from:to:when]`, `[a|b]` and `AND` (composable diffusion).

Prompts are shared between tools, so a prompt copied from the webui must switch text at the
same sampling steps here. The semantics follow the webui's `modules/prompt_parser.py`
(`get_learned_conditioning_prompt_schedules`, `get_multicond_prompt_list`,
`reconstruct_cond_batch`) with its default `use_old_scheduling=False`:

- Prompt editing `[from:to:when]` shows `from` up to and including schedule step `when`, then
  `to`; `[to:when]` adds `to` after `when`, `[from::when]` removes `from` after `when`.
  `when` is a NUMBER token: written with a `.` it is a fraction of the steps (`0.25`, `.5`,
  also `1.5` which the step clamp turns into "never switch"), without a `.` it is a step
  number (`5`, also `1e1`). The switch step is `min(steps, int(value))`; a step below 1 means
  `to` from the start. Floats are multiplied exactly as the webui does (`int(0.29 * 100)`
  is 28), so the boundaries agree to the step.
- Alternation `[a|b|c]` takes option `(n - 1) % len` at schedule step n (1-based); an empty
  option (`[fe|]male`) is the empty text. There is no speed or `:when` suffix
  (`[a|b:3]` does not parse, see below).
- Groups nest (`[a:[b:c:2]:1]`, `[[a|b]:c:3]`, `(a:[b:c:3])`); `(...)`, `(...:1.2)` and
  `[...]` without `:`/`|` are emphasis and stay in the text, brackets included, for the
  weighting parser. `\\x` escapes any character (`\\[`, `\\:`, `\\|`); escapes stay in the text.
- Outside every group, a stray `[ ] ( ) :` is literal text. A prompt the webui's grammar cannot
  parse at all (a `|` outside a valid alternation, a lone `\\` at the end or before a
  newline) is used unchanged for every step, schedules inside it included.
- A schedule is the webui's list of `(end_at_step, text)` pairs: one pair per step at which
  any group could switch (alternation: every step), ending with `steps`. Adjacent pairs may
  carry the same text, as in the webui.

Which text a sampling step uses: the webui's denoiser counts its calls from 0 and takes the
first pair with `step <= end_at_step` (`reconstruct_cond_batch`). So with
`[a:b:3]` at 10 steps, steps 0-3 use `a` and 4-9 use `b`; with `[a|b]`, steps 0 and 1 use `a`,
then b, a, b, ... `text_at_step` implements exactly that. Pass as `steps` the number of
denoiser calls the sampler makes (the webui passes `2 * steps` for second-order samplers).

Composable diffusion: the positive prompt is split on the word `AND` (uppercase, on word
boundaries: `cat,AND dog` splits, `ANDROID` does not) before any scheduling, so a bracket
cannot span an `AND`. Each sub-prompt may end in `:weight` (`a cat :1.2`, `:-0.5`, `:.5`);
the weight is cut off the text, trailing whitespace with it, leading whitespace stays
(`"a AND b"` gives `"a"` and `" b"`, as the webui). No weight means 1.0. Only the positive
prompt is AND-composed; the negative prompt is scheduled but never split or weighted
(`composable=False`).

How the engine combines the parts (the webui's `CFGDenoiser.combine_denoised`), per step:

    out_uncond = model(x, uncond_at_step)                 # negative prompt, scheduled
    out_i      = model(x, cond_i_at_step)                 # one per AND part
    denoised   = out_uncond + sum_i (w_i * cfg_scale) * (out_i - out_uncond)

Weights are not normalised (two parts of weight 1 double the guidance) and may be negative;
a single part with weight `w` is plain CFG at scale `w * cfg_scale`. The formula is linear, so
it holds for x0, eps and v predictions alike. Parts whose encodings have different token
lengths (prompts past 75 tokens) are padded, as `reconstruct_multicond_batch` does, by
repeating their last token vector up to the longest.

Deviations, all outside what the webui can do: `int(inf)` (`[a:b:1e999]`) raises in the
webui, here it switches never (`1e999`) or immediately (`-1e999`); a step at or past the last
end step gets the last text (the webui falls back to the first); a prompt nested too deeply
for Python's recursion limit is used unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from darkroom.text.prompt_parser import check_weight, shown

__all__ = [
    "ComposablePart",
    "ConditioningSchedule",
    "ScheduledText",
    "composable_parts",
    "is_plain",
    "prompt_schedules",
    "split_and",
    "text_at_step",
]

T = TypeVar("T")

# The grammar's SIGNED_NUMBER, alternatives in the same order (Python's re takes the first
# alternative that matches, as lark's dynamic lexer does).
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_SPACE = re.compile(r"\s*")
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^([\s\S]*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


@dataclass(frozen=True)
class _Edit:
    """`[before:after:when]`; `before` is None for `[after:when]`."""

    before: tuple[_Node, ...] | None
    after: tuple[_Node, ...]
    when: str


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple[_Node, ...], ...]


_Node = str | _Edit | _Alternate


class _Unparseable(Exception):
    """The whole prompt has no parse in the webui's grammar."""


@dataclass
class _Frame:
    """An open `[` or `(` whose group is being read: its parts between `:`/`|` separators."""

    bracket: str
    start: int
    segments: list[list[_Node]] = field(default_factory=lambda: [[]])
    separators: list[str] = field(default_factory=list)
    segment_starts: list[int] = field(default_factory=list)


def _number(text: str) -> str | None:
    """`[WHITESPACE] NUMBER [WHITESPACE]` filling `text`: the number's text."""
    start = _SPACE.match(text).end()
    number = _NUMBER.match(text, start)  # the lexer's one match, no backtracking into it
    if number is None or _SPACE.match(text, number.end()).end() != len(text):
        return None
    return number.group(0)


def _close(frame: _Frame, closer: str, text: str, end: int) -> list[_Node] | None:
    """The nodes of a group closed by `closer` at `end`, or None when it is not a group of the grammar."""
    segments, seps = [_merge(s) for s in frame.segments], "".join(frame.separators)
    if frame.bracket == "(":
        if closer != ")" or seps not in ("", ":"):
            return None
        return ["(", *segments[0], ")"] if not seps else ["(", *segments[0], ":", *segments[1], ")"]
    if closer != "]":
        return None
    if not seps:
        return ["[", *segments[0], "]"]
    if seps == "|" * len(seps):
        return [_Alternate(tuple(segments))]
    if seps not in (":", "::"):
        return None
    when = _number(text[frame.segment_starts[-1] : end])
    if when is None:
        return None
    if seps == ":":
        return [_Edit(None, segments[0], when)]
    return [_Edit(segments[0], segments[1], when)]


def _merge(nodes: list[_Node]) -> tuple[_Node, ...]:
    """Adjacent text joined, empty text dropped. Runs are joined once (not `+=` per piece, which
    copies the growing string each time: quadratic on a long prompt)."""
    out: list[_Node] = []
    run: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            run.append(node)
            continue
        if run:
            out.append("".join(run))
            run = []
        out.append(node)
    if run:
        out.append("".join(run))
    return tuple(node for node in out if node != "")


def _parse(prompt: str) -> tuple[_Node, ...] | None:
    """The prompt's nodes, or None when it is used unchanged (no parse in the webui's grammar)."""
    try:
        return _read(prompt)
    except _Unparseable:
        return None


def _read(prompt: str) -> tuple[_Node, ...]:
    """The prompt's nodes; raises `_Unparseable`.

    One left-to-right pass with a stack of open groups. Inside a group every bracket must
    belong to a group and `:`/`|` only separate, so a group opening at a position has at most
    one reading: the results are kept by position. When a group turns out not to be one (wrong
    closer, bad separators, end of text), every group open around it fails with it, the
    outermost one's bracket becomes literal text, and reading resumes after it. A group that
    reads is taken as a group, as lark resolves the grammar's ambiguity (where a group directly
    followed by a stray bracket or colon makes the webui's choice depend on Python's hash
    seed, this is one of its choices).
    """
    text, out, stack = prompt, [], []
    groups: dict[int, tuple[list[_Node], int] | None] = {}
    i = 0

    def fail_open_groups() -> int:
        for frame in stack:
            groups[frame.start] = None
        restart = stack[0].start
        stack.clear()
        out.append(text[restart])
        return restart + 1

    while True:
        target = stack[-1].segments[-1] if stack else out
        if i >= len(text):
            if not stack:
                return _merge(out)
            i = fail_open_groups()
            continue
        char = text[i]
        if char in "[(":
            if i not in groups:
                stack.append(_Frame(char, i))
                i += 1
            elif groups[i] is None:
                if stack:
                    i = fail_open_groups()
                else:
                    out.append(char)
                    i += 1
            else:
                nodes, i = groups[i]
                target.extend(nodes)
        elif char == "\\":
            if i + 1 >= len(text) or text[i + 1] == "\n":
                raise _Unparseable  # no token of the grammar can take this backslash
            target.append(text[i : i + 2])
            i += 2
        elif stack and char in ":|":
            frame = stack[-1]
            frame.separators.append(char)
            frame.segments.append([])
            frame.segment_starts.append(i + 1)
            i += 1
        elif stack and char in "])":
            frame = stack.pop()
            nodes = _close(frame, char, text, i)
            if nodes is None:
                stack.append(frame)
                i = fail_open_groups()
            else:
                groups[frame.start] = (nodes, i + 1)
                (stack[-1].segments[-1] if stack else out).extend(nodes)
                i += 1
        elif char == "|":
            raise _Unparseable  # a `|` outside any group
        else:  # text, whitespace, and the stray `] ) :` the top level allows
            target.append(char)
            i += 1


def _walk(nodes: Sequence[_Node]) -> Iterator[_Edit | _Alternate]:
    """Every editing and alternation group, nested ones included (iterative: no recursion limit)."""
    pending = list(reversed(nodes))
    while pending:
        node = pending.pop()
        if isinstance(node, _Edit):
            yield node
            pending.extend(reversed(node.after))
            pending.extend(reversed(node.before or ()))
        elif isinstance(node, _Alternate):
            yield node
            for option in reversed(node.options):
                pending.extend(reversed(option))


@dataclass(frozen=True)
class _Steps:
    """How `when` numbers become schedule steps (the webui's `collect_steps`)."""

    steps: int
    int_offset: int = 0
    float_offset: float = 0.0
    old: bool = False

    def when(self, number: str) -> int | float:
        value = float(number)
        if self.old:
            value = value * self.steps if value < 1 else value
        elif "." in number:
            value = (value - self.float_offset) * self.steps
        else:
            value = value - self.int_offset
        if math.isinf(value):  # the webui raises on int(inf)
            return self.steps if value > 0 else -math.inf
        return min(self.steps, int(value))


def _render(nodes: Sequence[_Node], step: int, steps: _Steps) -> str:
    parts: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Edit):
            if step <= steps.when(node.when):
                if node.before is not None:
                    parts.append(_render(node.before, step, steps))
            else:
                parts.append(_render(node.after, step, steps))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(parts)


def prompt_schedules(
    prompt: str, steps: int, *, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """The webui's `get_learned_conditioning_prompt_schedules([prompt], steps)[0]`, as tuples.

    `(end_at_step, text)` pairs, end steps increasing, the last one `steps`. No `AND`
    handling: the whole prompt is one text (that is how the webui schedules a negative
    prompt). `hires_steps` gives the webui's schedule for a hires-fix second pass: integer
    `when`s count on from the first pass's `steps`, fractions from 1.0 (`[a:b:1.5]` switches
    half-way through the second pass). `use_old_scheduling=True` is the webui's
    compatibility option: values below 1 are fractions, anything else a step number, and the
    second pass reuses the first pass's schedule.
    """
    if steps < 1 or (hires_steps is not None and hires_steps < 1):
        raise ValueError(f"steps must be at least 1, got {steps} (hires_steps {hires_steps})")
    if hires_steps is None or use_old_scheduling:
        config = _Steps(steps, old=use_old_scheduling)
    else:
        config = _Steps(hires_steps, int_offset=steps, float_offset=1.0)
    nodes = _parse(prompt)
    if nodes is None:
        return [(config.steps, prompt)]
    ends = {config.steps}
    for node in _walk(nodes):
        if isinstance(node, _Alternate):
            ends.update(range(1, config.steps + 1))
        else:
            when = config.when(node.when)
            if when >= 1:
                ends.add(int(when))
    try:
        return [(end, _render(nodes, end, config)) for end in sorted(ends)]
    except RecursionError:  # hundreds of nested editing groups
        return [(config.steps, prompt)]


@dataclass(frozen=True)
class ScheduledText:
    """One (sub-)prompt's schedule: `(end_at_step, text)` pairs, end steps increasing, the last == steps."""

    schedule: tuple[tuple[int, str], ...]

    @property
    def texts(self) -> tuple[str, ...]:
        """The distinct texts, in order of first use."""
        return tuple(dict.fromkeys(text for _, text in self.schedule))

    @property
    def is_static(self) -> bool:
        """True when every step uses the same text."""
        return len(self.texts) == 1

    def at(self, step: int) -> str:
        return text_at_step(self, step)


@dataclass(frozen=True)
class ComposablePart:
    """One `AND` part of a positive prompt: its guidance weight and its schedule."""

    weight: float
    schedule: ScheduledText


def text_at_step(schedule: ScheduledText | Sequence[tuple[int, str]], step: int) -> str:
    """The text sampling step `step` uses, counting steps from 0 as the sampling loop does.

    The first pair with `step <= end_at_step`, as the webui's `reconstruct_cond_batch`
    (so the first text also covers step 0: `[(3, "a"), (10, "b")]` gives `a` for steps
    0-3). A step past the last end step gets the last text.
    """
    pairs = schedule.schedule if isinstance(schedule, ScheduledText) else schedule
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not pairs:
        raise ValueError("empty schedule")
    for end, text in pairs:
        if step <= end:
            return text
    return pairs[-1][1]


def split_and(prompt: str) -> list[tuple[str, float]]:
    """The webui's `get_multicond_prompt_list` for one prompt: `(text, weight)` per `AND` part."""
    parts = []
    for sub in _AND.split(prompt):
        match = _WEIGHT.search(sub)
        if match is None:  # cannot happen (the pattern matches any string), kept as the webui has it
            parts.append((sub, 1.0))
            continue
        text, weight = match.groups()
        value = float(weight) if weight is not None else 1.0
        check_weight(value, f"the AND weight {shown(weight or '1')}")  # 400 digits of weight would be inf
        parts.append((text, value))
    return parts


def composable_parts(
    prompt: str, steps: int, *, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[ComposablePart]:
    """A positive prompt's `AND` parts, each with its weight and its own schedule."""
    return [
        ComposablePart(
            weight,
            ScheduledText(
                tuple(prompt_schedules(text, steps, hires_steps=hires_steps, use_old_scheduling=use_old_scheduling))
            ),
        )
        for text, weight in split_and(prompt)
    ]


def is_plain(prompt: str, *, composable: bool = True) -> bool:
    """True when the prompt needs no per-step work: one part, weight 1.0, the prompt itself at every step.

    False as soon as it has prompt editing or alternation (even one that never switches),
    or, with `composable` (a positive prompt), an `AND`, a `:weight` suffix or trailing
    whitespace (which the weight split removes). A prompt the webui cannot parse is plain.
    """
    if composable:
        parts = split_and(prompt)
        if len(parts) != 1 or parts[0] != (prompt, 1.0):
            return False
    nodes = _parse(prompt)
    return nodes is None or not any(True for _ in _walk(nodes))


class ConditioningSchedule(Generic[T]):
    """Per-step conditioning for one prompt, each distinct text encoded once.

    `encode(text)` is called eagerly, once per distinct text over all parts and steps, in
    order of first use (as the webui encodes every scheduled text before sampling). With
    `composable=True` (the positive prompt) the prompt is split on `AND` into weighted parts;
    with `composable=False` (the negative prompt) it is one part of weight 1.0, scheduled
    but not split.

    Sampling loop, webui style (see the module docstring for the combination formula)::

        pos = ConditioningSchedule(prompt, total_steps, encode)
        neg = ConditioningSchedule(negative, total_steps, encode, composable=False)
        for step in range(total_steps):  # one step per denoiser call
            (_, uncond), = neg.parts_at(step)
            out_u = model(x, uncond)
            denoised = out_u + sum(w * cfg * (model(x, c) - out_u) for w, c in pos.parts_at(step))
    """

    def __init__(
        self,
        prompt: str,
        steps: int,
        encode: Callable[[str], T],
        *,
        composable: bool = True,
        hires_steps: int | None = None,
        use_old_scheduling: bool = False,
    ) -> None:
        options = {"hires_steps": hires_steps, "use_old_scheduling": use_old_scheduling}
        if composable:
            self.parts = composable_parts(prompt, steps, **options)
        else:
            self.parts = [ComposablePart(1.0, ScheduledText(tuple(prompt_schedules(prompt, steps, **options))))]
        self.prompt = prompt
        self.steps = hires_steps if hires_steps is not None and not use_old_scheduling else steps
        texts = dict.fromkeys(text for part in self.parts for text in part.schedule.texts)
        self._encoded: dict[str, T] = {text: encode(text) for text in texts}
        self.distinct_texts: int = len(self._encoded)

    @property
    def texts(self) -> tuple[str, ...]:
        """The distinct texts that were encoded, in order of first use."""
        return tuple(self._encoded)

    @property
    def is_static(self) -> bool:
        """True when every step has the same conditioning (no switch in any part)."""
        return all(part.schedule.is_static for part in self.parts)

    def texts_at(self, step: int) -> list[tuple[float, str]]:
        """`(weight, text)` for each part at 0-based sampling step `step`."""
        return [(part.weight, text_at_step(part.schedule, step)) for part in self.parts]

    def parts_at(self, step: int) -> list[tuple[float, T]]:
        """`(weight, encoded)` for each part at 0-based sampling step `step`."""
        return [(weight, self._encoded[text]) for weight, text in self.texts_at(step)]

    def switch_steps(self) -> list[int]:
        """The 0-based steps whose conditioning differs from the step before (for caching)."""
        out, previous = [], self.texts_at(0)
        for step in range(1, self.steps):
            current = self.texts_at(step)
            if current != previous:
                out.append(step)
            previous = current
        return out
