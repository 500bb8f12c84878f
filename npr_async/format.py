"""The NPR output format on text: parser to a tree and the last `\\boxed{}`.

Works on text with the tags written out, which covers Stage 1 (tags as plain text) and decoded special tokens.
Nothing here raises, whatever the input: non-text input parses as an empty document (score -1.5, no answer).
The format score, `validate` and `check_guideline` live in npr_async/format_score.py and are re-exported here.

Grammar of a block (whitespace anywhere):
    <guideline> (text | <plan>text</plan>)* </guideline> (text | <step> body </step>)+ <takeaway>text</takeaway>
A step's body is text with nested blocks. A tag that is not part of a complete block is a *stray tag*.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from npr_async.tags import GUIDELINE, GUIDELINE_END, PLAN, PLAN_END, STEP, STEP_END, TAKEAWAY, TAKEAWAY_END

TAG_RE = re.compile(r"(</?(?:guideline|plan|step|takeaway)>)")
ID_RE = re.compile(r"\s*(\d+(?:\.\d+)*)\s*:")  # `<plan>\s*N(.N)*\s*:` and the step header `K:`
PARSE_DEPTH_LIMIT = 32  # deeper `<guideline>`s are stray tags: keeps recursion bounded on hostile input


@dataclass
class Plan:
    text: str  # everything between <plan> and </plan>
    id: str | None  # "1", "2.1", ... or None when the text does not start with `N(.N)*:`


@dataclass
class Step:
    text: str  # everything between <step> and </step>, nested blocks included
    id: str | None
    blocks: list["Block"] = field(default_factory=list)  # nested blocks
    stray_tags: list[str] = field(default_factory=list)


@dataclass
class Block:
    plans: list[Plan]
    steps: list[Step]
    takeaway: str
    depth: int  # 0 at the top level; a block inside a step is one deeper
    outer_text: str = ""  # guideline text before the first / after the last plan
    between_plans: str = ""  # guideline text between two plans
    between_steps: str = ""  # text in the step region outside the steps


@dataclass
class Document:
    blocks: list[Block]  # complete top-level blocks
    stray_tags: list[tuple[str, int]]  # (tag, number of blocks before it) at the top level
    final_text: str  # text after the last block (all of it when there is none)
    answer: str | None  # content of the last \boxed{} / \fbox{}

    def all_blocks(self) -> list[Block]:
        out, todo = [], list(self.blocks)
        while todo:
            b = todo.pop(0)
            out.append(b)
            todo.extend(nb for s in b.steps for nb in s.blocks)
        return out


class _Parser:
    """Recursive descent with memos: each (index, depth) is tried once, so hostile input parses in ~linear time."""

    def __init__(self, text: str):
        self.items = [p for p in TAG_RE.split(text) if p]
        self.tags = [p if TAG_RE.fullmatch(p) else None for p in self.items]
        self.last_end = 0  # item index after the last top-level block
        self.block_memo: dict[tuple[int, int], tuple[Block, int] | None] = {}
        self.end_memo: dict[tuple[int, int], int] = {}

    def tag(self, i: int) -> str | None:
        return self.tags[i] if i < len(self.tags) else None

    def end_of_step(self, i: int, depth: int) -> int:
        """Index of the </step> (or the end) that closes a step body starting at i; memoised along the path."""
        path, j = [], i
        while (j, depth) not in self.end_memo and j < len(self.items) and self.tags[j] != STEP_END:
            path.append(j)
            found = self.tags[j] == GUIDELINE and depth < PARSE_DEPTH_LIMIT and self.block(j, depth)
            j = found[1] if found else j + 1
        end = self.end_memo.get((j, depth), j)
        for k in path:
            self.end_memo[(k, depth)] = end
        return end

    def body(self, i: int, depth: int, in_step: bool):
        """Text with blocks, up to the end or (in a step) the next </step>; returns blocks, strays, index."""
        blocks, strays = [], []
        while i < len(self.items):
            tag = self.tag(i)
            if tag is None:
                i += 1
            elif tag == STEP_END and in_step:
                break
            elif tag == GUIDELINE and depth < PARSE_DEPTH_LIMIT and (found := self.block(i, depth)):
                blocks.append(found[0])
                i = found[1]
                if not in_step:
                    self.last_end = i
            else:
                strays.append((tag, len(blocks)))
                i += 1
        return blocks, strays, i

    def block(self, i: int, depth: int) -> tuple[Block, int] | None:
        """A complete block starting at the <guideline> at i, and the index after it; or None."""
        if (i, depth) not in self.block_memo:
            self.block_memo[(i, depth)] = self._block(i, depth)
        return self.block_memo[(i, depth)]

    def _block(self, i: int, depth: int) -> tuple[Block, int] | None:
        plans, outer, between, pending = [], [], [], ""
        i += 1
        while (tag := self.tag(i)) != GUIDELINE_END:
            if i >= len(self.items):
                return None
            if tag is None:
                pending += self.items[i]
                i += 1
            elif tag == PLAN:
                (between if plans else outer).append(pending)
                pending, text = "", ""
                if self.tag(i + 1) is None and i + 1 < len(self.items):
                    text, i = self.items[i + 1], i + 1
                if self.tag(i + 1) != PLAN_END:
                    return None
                m = ID_RE.match(text)
                plans.append(Plan(text, m.group(1) if m else None))
                i += 2
            else:
                return None
        outer.append(pending)
        steps, between_steps = [], []
        i += 1
        while (tag := self.tag(i)) != TAKEAWAY:
            if i >= len(self.items):
                return None
            if tag is None:
                between_steps.append(self.items[i])
                i += 1
            elif tag == STEP:
                end = self.end_of_step(i + 1, depth + 1)
                if self.tag(end) != STEP_END:
                    return None
                steps.append((i + 1, end))
                i = end + 1
            else:
                return None
        take = ""
        if self.tag(i + 1) is None and i + 1 < len(self.items):
            take, i = self.items[i + 1], i + 1
        if not steps or self.tag(i + 1) != TAKEAWAY_END:
            return None
        built = []
        for start, end in steps:  # the block is complete: now collect its steps' contents
            blocks, strays, _ = self.body(start, depth + 1, in_step=True)
            text = "".join(self.items[start:end])
            m = ID_RE.match(text)
            built.append(Step(text, m.group(1) if m else None, blocks, [t for t, _ in strays]))
        return Block(plans, built, take, depth, "".join(outer), "".join(between), "".join(between_steps)), i + 2


def parse(text) -> Document:
    """Parse a response into its top-level blocks, stray tags, final text and answer. Never raises."""
    if not isinstance(text, str):
        return Document([], [], "", None)
    p = _Parser(text)
    blocks, strays, _ = p.body(0, 0, in_step=False)
    return Document(blocks, strays, "".join(p.items[p.last_end:]), last_boxed(text))


def last_boxed(text) -> str | None:
    """Content of the last complete `\\boxed{...}` (also `\\boxed {...}`, `\\fbox{...}`), nested braces kept.

    Escaped braces `\\{ \\}` do not count for nesting. Unbalanced boxes are skipped. None when there is none."""
    if not isinstance(text, str):
        return None
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        depth, i = 1, m.end()
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            depth += (c == "{") - (c == "}")
            if depth == 0:
                return text[m.end():i]
            i += 1
    return None
