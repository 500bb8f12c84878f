"""The NPR output format on text: parser to a tree, validators, NPR's format score, the last `\\boxed{}`.

Works on text with the tags written out, which covers Stage 1 (tags as plain text) and decoded special tokens.
Nothing here raises, whatever the input: non-text input parses as an empty document (score -1.5, no answer).

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


@dataclass
class FormatScore:
    score: float  # 0.0 perfect; -1.5 / -1.0 structural failures; otherwise minus the penalties (>= -2.0)
    reasons: list[str]


def score_format(text) -> FormatScore:
    """NPR's format score (NPR-FACTS.md, "Format score"), with how each rubric item is read here:

    - The text is stripped first. Blocks are the complete blocks of the grammar above, at any depth.
    - -1.5: no top-level block, or stray tags before the first block, between blocks, or inside a step
      outside its nested blocks (the start of the response counts as a block boundary).
    - -1.0: a block (at any depth) with zero plans or with #steps != #plans; stray tags after the last block;
      no `\\boxed{}` anywhere, or the last one is empty (whitespace only).
    - Otherwise 0 minus, per block (nested included): 0.4 once if the guideline has non-whitespace text before
      its first or after its last plan; 0.2 once for non-whitespace text between two plans; 0.2 once for
      non-whitespace text between `</guideline>`, the steps and `<takeaway>`; 0.4 per plan whose stripped text
      (id included) is shorter than 3 characters; 0.4 per step whose stripped text is shorter than 6; 0.4 if
      the stripped takeaway is shorter than 6. The sum is capped at 2.0, NPR's stated range (0, -2].
    """
    if not isinstance(text, str):
        return FormatScore(-1.5, [f"not text: {type(text).__name__}"])
    doc = parse(text.strip())
    blocks = doc.all_blocks()
    if not doc.blocks:
        return FormatScore(-1.5, ["no complete guideline/step/takeaway block"])
    between = [t for t, k in doc.stray_tags if k < len(doc.blocks)]
    in_steps = [t for b in blocks for s in b.steps for t in s.stray_tags]
    if between or in_steps:
        return FormatScore(-1.5, [f"tags between blocks: {between}"] * bool(between)
                           + [f"stray tags inside steps: {in_steps}"] * bool(in_steps))
    hard = [f"block {k}: zero plans" for k, b in enumerate(blocks) if not b.plans]
    hard += [f"block {k}: {len(b.steps)} steps for {len(b.plans)} plans"
             for k, b in enumerate(blocks) if b.plans and len(b.steps) != len(b.plans)]
    after = [t for t, k in doc.stray_tags if k == len(doc.blocks)]
    hard += [f"tags after the last block: {after}"] * bool(after)
    if doc.answer is None or not doc.answer.strip():
        hard.append("missing or empty \\boxed{}")
    if hard:
        return FormatScore(-1.0, hard)
    penalty, reasons = 0.0, []

    def pay(amount: float, why: str):
        nonlocal penalty
        penalty += amount
        reasons.append(f"-{amount}: {why}")

    for k, b in enumerate(blocks):
        if b.outer_text.strip():
            pay(0.4, f"block {k}: non-plan text inside the guideline")
        if b.between_plans.strip():
            pay(0.2, f"block {k}: stray text between plans")
        if b.between_steps.strip():
            pay(0.2, f"block {k}: stray text between steps")
        for p in b.plans:
            if len(p.text.strip()) < 3:
                pay(0.4, f"block {k}: plan {p.text.strip()!r} shorter than 3 characters")
        for s in b.steps:
            if len(s.text.strip()) < 6:
                pay(0.4, f"block {k}: step {s.text.strip()!r} shorter than 6 characters")
        if len(b.takeaway.strip()) < 6:
            pay(0.4, f"block {k}: takeaway shorter than 6 characters")
    return FormatScore(round(-min(penalty, 2.0), 6), reasons)


def format_score(text) -> float:
    return score_format(text).score


def validate(text, max_plans: int = 5, max_depth: int = 5) -> list[str]:
    """Structural errors of a response (empty list: valid): no block, stray tags (order), plan count outside
    1..max_plans, #steps != #plans, plan ids not `N(.N)*:`, blocks nested max_depth or deeper."""
    if not isinstance(text, str):
        return [f"not text: {type(text).__name__}"]
    doc = parse(text)
    errors = [] if doc.blocks else ["no complete guideline/step/takeaway block"]
    errors += [f"stray tag {t} after block {k}" for t, k in doc.stray_tags]
    for k, b in enumerate(doc.all_blocks()):
        if not 1 <= len(b.plans) <= max_plans:
            errors.append(f"block {k}: {len(b.plans)} plans, allowed 1..{max_plans}")
        if len(b.steps) != len(b.plans):
            errors.append(f"block {k}: {len(b.steps)} steps for {len(b.plans)} plans")
        errors += [f"block {k}: plan id of {p.text[:20]!r} is not N(.N)*:" for p in b.plans if p.id is None]
        errors += [f"block {k}: stray tag {t} inside a step" for s in b.steps for t in s.stray_tags]
        if b.depth >= max_depth:
            errors.append(f"block {k}: nesting depth {b.depth + 1} exceeds {max_depth}")
    return errors


def check_guideline(text, max_plans: int = 5) -> tuple[int, str | None]:
    """Pre-branch check the engine runs when `</guideline>` is sampled: (number of plans, error or None).

    `text` is the guideline block, `<guideline>` … `</guideline>` (either tag may be left off). Errors: zero
    plans, more than max_plans, tags out of order (anything but alternating `<plan>`/`</plan>`), an unclosed
    plan, a plan whose text does not start with `N(.N)*:`."""
    if not isinstance(text, str):
        return 0, f"guideline is not text: {type(text).__name__}"
    body = text.strip()
    body = body[len(GUIDELINE):] if body.startswith(GUIDELINE) else body
    body = body[:-len(GUIDELINE_END)] if body.endswith(GUIDELINE_END) else body
    plans, open_at = 0, None
    for m in TAG_RE.finditer(body):
        tag = m.group(1)
        if tag == PLAN and open_at is None:
            open_at = m.end()
        elif tag == PLAN_END and open_at is not None:
            plan = body[open_at:m.start()]
            if not ID_RE.match(plan):
                return plans, f"plan {plans + 1} {plan[:30]!r} does not start with an id N(.N)*:"
            plans, open_at = plans + 1, None
        else:
            return plans, f"tag {tag} out of order in the guideline"
    if open_at is not None:
        return plans, f"plan {plans + 1} is not closed"
    if plans == 0:
        return 0, "the guideline has no plan"
    if plans > max_plans:
        return plans, f"{plans} plans, more than the limit {max_plans}"
    return plans, None
