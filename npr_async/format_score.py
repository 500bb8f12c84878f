"""Judging the NPR format on text: NPR's format score, structural validation, the pre-branch guideline check.

The parser (text -> tree) is npr_async/format.py; this module only reads its tree. Nothing here raises.
Every name here is also importable from npr_async.format, where most callers get it.
"""
from __future__ import annotations

from dataclasses import dataclass

from npr_async.format import ID_RE, TAG_RE, parse
from npr_async.tags import GUIDELINE, GUIDELINE_END, PLAN, PLAN_END


@dataclass
class FormatScore:
    score: float  # 0.0 perfect; -1.5 / -1.0 structural failures; otherwise minus the penalties (>= -2.0)
    reasons: list[str]


def score_format(text) -> FormatScore:
    """NPR's format score (NPR-FACTS.md, "Format score"), with how each rubric item is read here:

    - The text is stripped first. Blocks are the complete blocks of format.py's grammar, at any depth.
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
