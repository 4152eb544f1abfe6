"""The embedded demo task: continue the opening of a short product or film review.

A seeded generator writes demonstrations (mixed sentiment), preferences (pairwise
and ranked lists of K responses), PPO prompts, disjoint eval prompts, and feedback: thumbs up/down
(some with a 1..5 rating) that the same annotator gives to single responses. The
simulated annotator prefers more positive, fluent continuations: each response has
a latent score (sentiment + fluency) and a comparison is a Bradley-Terry draw on
the score difference with temperature `annotator_temperature` - realistic labels,
not perfect ones. Rankings are Plackett-Luce draws (Gumbel noise on score / T).

Determinism: only `random.Random(seed)` and fixed-format JSON, so the same seed and
sizes give byte-identical files (and the same DVC md5) on any machine.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from components.config import DataConfig

FILMS = [
    "the movie",
    "this film",
    "the sequel",
    "the documentary",
    "this thriller",
    "the comedy",
    "the animated film",
    "this drama",
    "the remake",
    "the series finale",
    "this horror film",
    "the musical",
    "the biopic",
    "this western",
    "the space opera",
    "the heist movie",
]
PRODUCTS = [
    "the blender",
    "these headphones",
    "this phone",
    "the vacuum",
    "this laptop",
    "the kettle",
    "these running shoes",
    "the coffee maker",
    "this backpack",
    "the smart watch",
    "the desk lamp",
    "this tent",
    "the air fryer",
    "these speakers",
    "the electric toothbrush",
    "this camera",
]
FILM_ASPECTS = ["story", "acting", "music", "ending", "pacing", "dialogue", "cast", "soundtrack", "plot", "camera work"]
PRODUCT_ASPECTS = ["battery", "design", "price", "build quality", "sound", "screen", "setup", "motor", "fabric", "app"]
OPENINGS = [
    "I watched {s} last night and",
    "After a week with {s}, I think",
    "Honest review of {s}:",
    "My family tried {s} and",
    "I had high hopes for {s}, and",
    "Compared to what I expected, {s}",
    "Two words about {s}:",
    "I finally got around to {s} and",
    "Short version: {s}",
    "If you are thinking about {s},",
    "So I spent the weekend with {s} and",
    "My take on {s} after a month:",
]
WHEN = ["", " this spring", " on a whim", " for my birthday", " with friends", " after many reviews", " on sale"]

POSITIVE = [
    "great",
    "wonderful",
    "excellent",
    "delightful",
    "brilliant",
    "superb",
    "lovely",
    "fantastic",
    "charming",
    "impressive",
    "beautiful",
    "smooth",
]
NEGATIVE = [
    "terrible",
    "awful",
    "boring",
    "disappointing",
    "dull",
    "broken",
    "mediocre",
    "painful",
    "cheap",
    "annoying",
    "clumsy",
    "weak",
]
NEUTRAL = ["okay", "fine", "average", "ordinary", "standard", "acceptable"]
CLAUSES = [
    "the {a} was {w}",
    "I found the {a} {w}",
    "the {a} felt {w}",
    "honestly the {a} is {w}",
    "the {a} turned out {w}",
    "everyone said the {a} was {w}",
]
CLOSINGS = {
    1: [
        "I would recommend it to anyone.",
        "Highly recommended.",
        "I loved it.",
        "Worth every penny.",
        "I will happily buy it again.",
    ],
    0: ["It does the job.", "Nothing special.", "It is what it is.", "Fine for the price."],
    -1: ["I would not buy it again.", "Avoid it.", "What a waste of money.", "I regret it.", "Skip this one."],
}
# Lexicon of the simulated annotator and of the demo's independent sentiment judge.
# Graded intensities (0.5..1.0, neutral words near 0) so "more positive" is continuous, not a tie.
LEXICON = {
    **{w: 0.5 + 0.5 * i / (len(POSITIVE) - 1) for i, w in enumerate(POSITIVE)},
    **{w: -0.5 - 0.5 * i / (len(NEGATIVE) - 1) for i, w in enumerate(NEGATIVE)},
    **{w: 0.04 * (i - 2.5) for i, w in enumerate(NEUTRAL)},
    "loved": 1.0,
    "recommend": 0.8,
    "recommended": 0.9,
    "worth": 0.7,
    "happily": 0.8,
    "avoid": -1.0,
    "waste": -0.9,
    "regret": -0.8,
    "skip": -0.7,
    "not": -0.6,
}


@dataclass
class Response:
    text: str
    sentiment: float  # in [-1, 1]
    fluent: bool

    @property
    def score(self) -> float:
        """The annotator's latent preference: positive and fluent is better."""
        return self.sentiment + (0.6 if self.fluent else -0.6)


def lexicon_sentiment(text: str) -> float:
    """Mean lexicon polarity of the words in `text`, in [-1, 1] (0 when none match)."""
    words = [w.strip(".,:;!?").lower() for w in text.split()]
    hits = [LEXICON[w] for w in words if w in LEXICON]
    return sum(hits) / len(hits) if hits else 0.0


class DemoGenerator:
    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)

    # -- prompts ---------------------------------------------------------------------------
    def all_prompts(self) -> list[tuple[str, str]]:
        """Every distinct (prompt, domain), in a seeded order."""
        out = [
            (o.replace("{s}", s + w) if "{s}" in o else o, dom)
            for dom, subjects in (("film", FILMS), ("product", PRODUCTS))
            for s in subjects
            for o in OPENINGS
            for w in WHEN
        ]
        out = [(p[0].upper() + p[1:], d) for p, d in out]
        self.rng.shuffle(out)
        return out

    # -- responses -------------------------------------------------------------------------
    def response(self, domain: str, target: float | None = None, fluent: bool | None = None) -> Response:
        """A continuation whose clauses lean towards `target` sentiment (-1..1)."""
        rng = self.rng
        target = rng.uniform(-1, 1) if target is None else target
        fluent = (rng.random() < 0.8) if fluent is None else fluent
        aspects = FILM_ASPECTS if domain == "film" else PRODUCT_ASPECTS
        polarities = []
        for _ in range(rng.choice((2, 2, 3))):
            u = rng.random()
            p_pos, p_neg = max(0.0, target) * 0.85 + 0.1, max(0.0, -target) * 0.85 + 0.1
            polarities.append(1 if u < p_pos else (-1 if u < p_pos + p_neg else 0))
        words = {1: POSITIVE, -1: NEGATIVE, 0: NEUTRAL}
        clauses = [rng.choice(CLAUSES).format(a=rng.choice(aspects), w=rng.choice(words[p])) for p in polarities]
        overall = sum(polarities) / len(polarities)
        closing = rng.choice(CLOSINGS[1 if overall > 0.34 else (-1 if overall < -0.34 else 0)])
        text = ", and ".join(clauses[:2]) + (f", but {clauses[2]}" if len(clauses) > 2 else "") + ". " + closing
        if not fluent:
            text = self._disfluent(text)
        return Response(text, sentiment=lexicon_sentiment(text), fluent=fluent)

    def _disfluent(self, text: str) -> str:
        """Repeat, drop and swap words: the kind of text the annotator dislikes."""
        words = text.split()
        rng = self.rng
        for _ in range(rng.randint(2, 4)):
            i = rng.randrange(len(words))
            op = rng.random()
            if op < 0.4:
                words.insert(i, words[i])
            elif op < 0.7 and len(words) > 4:
                words.pop(i)
            else:
                j = rng.randrange(len(words))
                words[i], words[j] = words[j], words[i]
        return " ".join(words)

    # -- the annotator ---------------------------------------------------------------------
    def prefer(self, a: Response, b: Response) -> bool:
        """Bradley-Terry: P(a > b) = sigmoid((s_a - s_b) / T)."""
        z = (a.score - b.score) / self.cfg.annotator_temperature
        return self.rng.random() < 1.0 / (1.0 + math.exp(-z))

    def rank(self, responses: list[Response]) -> list[Response]:
        """Plackett-Luce ranking, best first: sort by score / T + Gumbel noise."""
        t = self.cfg.annotator_temperature
        keyed = [(r.score / t - math.log(-math.log(self.rng.random() or 1e-12)), i) for i, r in enumerate(responses)]
        return [responses[i] for _, i in sorted(keyed, reverse=True)]

    # -- data sets -------------------------------------------------------------------------
    def generate(self) -> dict[str, list[dict]]:
        """The demo data set per kind; eval prompts are split off first and never trained on."""
        cfg = self.cfg
        prompts = self.all_prompts()
        if cfg.n_eval + 50 > len(prompts):
            raise ValueError(
                f"demo has {len(prompts)} distinct prompts; n_eval={cfg.n_eval} leaves too few for training"
            )
        eval_prompts, train_pool = prompts[: cfg.n_eval], prompts[cfg.n_eval :]
        demonstrations = []
        for i in range(cfg.n_demonstrations):
            p, dom = self.rng.choice(train_pool)
            r = self.response(dom, fluent=True)
            demonstrations.append({"id": f"demo-{i:06d}", "prompt": p, "response": r.text, "source": "demo"})
        preferences = self._preferences(train_pool)
        ppo_prompts = [
            {"id": f"prompt-{i:06d}", "prompt": p, "source": "demo"}
            for i, (p, _) in enumerate(train_pool[: cfg.n_prompts])
        ]
        evals = [{"id": f"eval-{i:06d}", "prompt": p, "source": "demo"} for i, (p, _) in enumerate(eval_prompts)]
        feedback = self._feedback(train_pool)  # last: the other kinds stay as they were before feedback existed
        return {
            "demonstrations": demonstrations,
            "preferences": preferences,
            "prompts": ppo_prompts,
            "eval": evals,
            "feedback": feedback,
        }

    # The annotator's thumbs: up with probability sigmoid((score - THUMBS_MIDPOINT) / T). The midpoint is the
    # median latent score of a demo response (measured over 20000: 0.49), so about half the thumbs are up.
    THUMBS_MIDPOINT = 0.49

    def thumbs(self, r: Response) -> int:
        z = (r.score - self.THUMBS_MIDPOINT) / self.cfg.annotator_temperature
        return int(self.rng.random() < 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z)))))

    def rating(self, r: Response, label: int) -> int:
        """Stars 1..5 from the latent score with noise, on the label's side of 3 (3 goes with either)."""
        stars = round(3 + 2 * math.tanh((r.score - self.THUMBS_MIDPOINT) / 0.5) + self.rng.gauss(0, 0.5))
        stars = max(1, min(5, stars))
        return max(stars, 3) if label == 1 else min(stars, 3)

    def _feedback(self, train_pool: list[tuple[str, str]]) -> list[dict]:
        """n_feedback distinct rows: a training prompt, one response (any sentiment, fluent or not), the
        annotator's thumbs and, for a feedback_rating_fraction share, a rating."""
        cfg, rng = self.cfg, self.rng
        rows: list[dict] = []
        seen: set[tuple] = set()
        while len(rows) < cfg.n_feedback:
            p, dom = rng.choice(train_pool)
            r = self.response(dom)
            label = self.thumbs(r)
            if (p, r.text, label) in seen:
                continue
            seen.add((p, r.text, label))
            row = {"id": f"fb-{len(rows):06d}", "prompt": p, "response": r.text, "label": label}
            if rng.random() < cfg.feedback_rating_fraction:
                row["rating"] = self.rating(r, label)
            rows.append({**row, "source": "demo"})
        return rows

    def _preferences(self, train_pool: list[tuple[str, str]]) -> list[dict]:
        """n_preferences distinct rows: a ranking with probability ranked_fraction, else a pair."""
        cfg, rng = self.cfg, self.rng
        preferences: list[dict] = []
        seen: set[tuple] = set()
        while len(preferences) < cfg.n_preferences:
            p, dom = rng.choice(train_pool)
            made = self._ranking(p, dom) if rng.random() < cfg.ranked_fraction else self._pair(p, dom)
            if made is None or made[0] in seen:
                continue
            key, fields = made
            seen.add(key)
            preferences.append({"id": f"pref-{len(preferences):06d}", **fields, "source": "demo"})
        return preferences

    def _ranking(self, p: str, dom: str) -> tuple[tuple, dict] | None:
        """(key, fields) of a ranked row for prompt `p`, or None when two responses came out the same."""
        k = self.rng.randint(3, self.cfg.max_rank_k)
        rs = [self.response(dom) for _ in range(k)]
        if len({r.text for r in rs}) < k:
            return None
        ranked = [r.text for r in self.rank(rs)]
        return (p, *ranked), {"prompt": p, "responses": ranked}

    def _pair(self, p: str, dom: str) -> tuple[tuple, dict] | None:
        """(key, fields) of a pairwise row for prompt `p`, or None when both responses came out the same."""
        a, b = self.response(dom), self.response(dom)
        if a.text == b.text:
            return None
        chosen, rejected = (a, b) if self.prefer(a, b) else (b, a)
        return (p, chosen.text, rejected.text), {"prompt": p, "chosen": chosen.text, "rejected": rejected.text}


DEMO_SHARD = "demo-000.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, separators=(", ", ": ")) + "\n")
    tmp.replace(path)


def write_demo(cfg: DataConfig, data_dir: Path) -> dict[str, int]:
    """Write the demo data set as one shard per kind; returns rows per kind. A kind set to 0 rows (e.g.
    `data.n_feedback=0`: a project with comparisons only) gets no shard: an empty file is bad data."""
    sets = DemoGenerator(cfg).generate()
    for kind, rows in sets.items():
        if rows:
            write_jsonl(data_dir / kind / DEMO_SHARD, rows)
    return {k: len(v) for k, v in sets.items()}
