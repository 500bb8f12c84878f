"""The eight NPR structure tags (special tokens from Stage 2 on; plain text in Stage 1)."""
GUIDELINE, GUIDELINE_END = "<guideline>", "</guideline>"
PLAN, PLAN_END = "<plan>", "</plan>"
STEP, STEP_END = "<step>", "</step>"
TAKEAWAY, TAKEAWAY_END = "<takeaway>", "</takeaway>"
NPR_TAGS = (GUIDELINE, GUIDELINE_END, PLAN, PLAN_END, STEP, STEP_END, TAKEAWAY, TAKEAWAY_END)


def step_header(k: int) -> str:
    """What the engine writes at the start of the k-th branch of a fork (1-based)."""
    return f"\n{STEP}\n{k}:"


JOIN_HEADER = f"\n{TAKEAWAY}\n"  # forced at the join, after the last sibling closed its step


class TagIds:
    """Token ids of the eight tags for one tokenizer (each tag must be a single token)."""

    def __init__(self, ids: dict[str, int]):
        missing = [t for t in NPR_TAGS if t not in ids]
        if missing:
            raise ValueError(f"tokenizer lacks NPR tags {missing}: run add_npr_tokens first")
        self.by_tag = dict(ids)
        self.guideline, self.guideline_end = ids[GUIDELINE], ids[GUIDELINE_END]
        self.plan, self.plan_end = ids[PLAN], ids[PLAN_END]
        self.step, self.step_end = ids[STEP], ids[STEP_END]
        self.takeaway, self.takeaway_end = ids[TAKEAWAY], ids[TAKEAWAY_END]
        self.all = frozenset(ids[t] for t in NPR_TAGS)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TagIds":
        ids = {}
        for tag in NPR_TAGS:
            enc = tokenizer.encode(tag, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"tag {tag} is {len(enc)} tokens in this tokenizer, expected 1: "
                                 "run add_npr_tokens first")
            ids[tag] = enc[0]
        return cls(ids)
