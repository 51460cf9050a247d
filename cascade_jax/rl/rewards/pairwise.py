"""Pairwise-judge (GenRM-style) rewards for the RLHF stage: training.md §2.5, after NeMo-Gym `genrm_compare`.

A judge model reads the user prompt and two responses of the same group and gives a helpfulness score to each
(1–5) and a ranking (1–6: 1 = response 1 much better, 6 = response 2 much better). Every group of rollouts of one
prompt is compared pair by pair, and the comparisons are aggregated into one reward per response
(`aggregate_group`): tie-break, mean over comparisons, a conciseness bonus among the best, and zero-centred
group-relative length terms.

What the judge sees: the user prompt and each response's *answer* only (the text after its last `</think>`,
end tokens stripped; "(empty response)" when there is none), as in `genrm_compare`, which sends the output
text and not the reasoning. The reasoning still counts through the length terms.

Lengths (`split_response`, `response_lengths`): a response decoded with its special tokens is split at its last
`</think>`: reasoning = before, answer = after; without `</think>` the reasoning is empty and the answer is
everything. End tokens are stripped (`strip_end_tokens`), and so is a leading `<think>`. A length is the number
of characters after stripping surrounding whitespace (`genrm_compare` measures characters too).

Reply format (`render_comparison`, `parse_comparison`): the judge ends with three lines `SCORE_1: <1-5>`,
`SCORE_2: <1-5>`, `RANKING: <1-6>`. The parser takes the last occurrence of each (case-insensitive; markdown
bold and JSON-style `"score_1": 4` are accepted), clamps scores to [1, 5] and the ranking to [1, 6]. Fallback,
for small judges that can only state a preference (our mapping, not NeMo-Gym's): a final `\\boxed{1}` /
`\\boxed{A}` means (4, 2, 2) (response 1 better) and `\\boxed{2}` / `\\boxed{B}` means (2, 4, 5). Anything else
is malformed.

Comparisons (`comparison_pairs`): `pairs="all"` compares every pair i < j of a group (G(G-1)/2 comparisons, as
[C2] does); `pairs="circular"` compares (i, i+1 mod G) (G comparisons, NeMo-Gym's default). `swap=True` also
asks every comparison in the other order, to average out position bias; both orders then count as comparisons
in each response's mean (default False: twice the judge calls).

Failures never raise: a comparison whose request failed or whose reply does not parse is left out of the
means and counted ("ok", "malformed", "timeout", "http_error", "connection_error", one per comparison).

Rewards are NOT in [0, 1]: they are scores around 1–5 plus bonuses and length terms; GRPO normalises them per
group afterwards.

    judge = PairwiseJudge(JudgeConfig(base_url="http://127.0.0.1:8000/v1", model="genrm"))
    rewards, counts = judge.group_rewards(prompts, responses, group_size=16)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Sequence

import numpy as np

from cascade_jax.rl.rewards import strip_end_tokens
from cascade_jax.rl.rewards.judge import OUTCOMES, JudgeClient, JudgeConfig

Comparison = tuple[float, float, float]     # (score_1 in [1, 5], score_2 in [1, 5], ranking in [1, 6])
PAIRINGS = ("all", "circular")
THINK_START, THINK_END = "<think>", "</think>"
EMPTY_ANSWER = "(empty response)"
RANKING_MIDPOINT = 3.5
PREFER_1: Comparison = (4.0, 2.0, 2.0)      # our mapping of a bare preference for response 1 ...
PREFER_2: Comparison = (2.0, 4.0, 5.0)      # ... and for response 2 (mirror images: ranking 2 <-> 7 - 2)

COMPARISON_TEMPLATE = """You are an impartial judge. Read the user's prompt and two candidate responses to it, then \
judge how helpful each response is: whether it is correct, complete, relevant, clear and honest, and whether it \
follows the prompt's instructions. Do not let the order of the responses, their length or their formatting sway \
you.

[PROMPT]
{prompt}
[END PROMPT]

[RESPONSE 1]
{response_1}
[END RESPONSE 1]

[RESPONSE 2]
{response_2}
[END RESPONSE 2]

Explain your judgement briefly. Then end your reply with exactly these three lines:
SCORE_1: <an integer from 1 to 5, the helpfulness of response 1; 5 is best>
SCORE_2: <an integer from 1 to 5, the helpfulness of response 2; 5 is best>
RANKING: <an integer from 1 to 6: 1 = response 1 is much better than response 2, 2 = response 1 is better, \
3 = response 1 is slightly better, 4 = response 2 is slightly better, 5 = response 2 is better, \
6 = response 2 is much better>"""

_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))"


def _key(name: str) -> re.Pattern:
    return re.compile(rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])[\"'*\s]*[:=][\"'*\s]*{_NUMBER}", re.IGNORECASE)


_SCORE_1, _SCORE_2, _RANKING = _key(r"score[ _-]?1"), _key(r"score[ _-]?2"), _key("ranking")
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")


@dataclasses.dataclass(frozen=True)
class PairwiseCoefficients:
    """The length adjustments of training.md §2.5. Defaults: the Nemotron-3-Super RLHF config ([NRL]
    `examples/nemo_gym/nemotron-3-super/stage3_rlhf.yaml`); the Nano-v3 / Cascade-2 values are NOT confirmed.
    Its `group_style_penalty_coeff 0.05` (style-density penalty) is not implemented."""

    reasoning_bonus: float = 0.5          # + for the shortest reasoning among the top scorers
    answer_bonus: float = 0.5             # + for the shortest answer among the top scorers
    top_percentile: float = 0.2           # fraction of the group eligible for the bonuses (at least 1)
    reasoning_length_coef: float = 0.3    # x the zero-centred reasoning length weight
    answer_length_coef: float = 0.35      # x the zero-centred answer length weight

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value >= 0):
                raise ValueError(f"PairwiseCoefficients.{field.name}: expected a finite number >= 0, got {value!r}")
        if not 0 < self.top_percentile <= 1:
            raise ValueError(f"PairwiseCoefficients.top_percentile: expected a number in (0, 1], "
                             f"got {self.top_percentile!r}")


def render_comparison(prompt: str, response_1: str, response_2: str) -> str:
    """The user message that asks the judge to compare `response_1` and `response_2` as answers to `prompt`."""
    return COMPARISON_TEMPLATE.format(prompt=prompt, response_1=response_1, response_2=response_2)


def parse_comparison(text: str | None) -> Comparison | None:
    """(score_1, score_2, ranking) from the judge's reply, or None when it is malformed (see the module doc)."""
    text = text or ""
    found = [pattern.findall(text) for pattern in (_SCORE_1, _SCORE_2, _RANKING)]
    if all(found):
        s1, s2, ranking = (float(matches[-1]) for matches in found)
        if all(math.isfinite(v) for v in (s1, s2, ranking)):
            return _clamp(s1, 1, 5), _clamp(s2, 1, 5), _clamp(ranking, 1, 6)
    boxed = _BOXED.findall(text)
    if boxed:
        choice = re.sub(r"^(?:response|answer)\s*", "", boxed[-1].strip(" \t\n*"), flags=re.IGNORECASE).upper()
        if choice in ("1", "A"):
            return PREFER_1
        if choice in ("2", "B"):
            return PREFER_2
    return None


def split_response(response: str) -> tuple[str, str]:
    """(reasoning, answer) of a response decoded with its special tokens: split at the last `</think>` (none:
    no reasoning, all answer), end tokens stripped, and a leading `<think>` (when the response repeats the one
    that opens the assistant turn) not counted as reasoning."""
    text = strip_end_tokens(response)
    reasoning, sep, answer = text.rpartition(THINK_END)
    return (reasoning.lstrip().removeprefix(THINK_START), answer) if sep else ("", text)


def response_lengths(response: str) -> tuple[int, int]:
    """(reasoning length, answer length) in characters, surrounding whitespace not counted."""
    reasoning, answer = split_response(response)
    return len(reasoning.strip()), len(answer.strip())


def comparison_pairs(group_size: int, pairs: str = "all", swap: bool = False) -> list[tuple[int, int]]:
    """The (i, j) index pairs compared in a group: response i is shown first. A group of one has none."""
    if pairs not in PAIRINGS:
        raise ValueError(f"pairs: expected one of {', '.join(PAIRINGS)}, got {pairs!r}")
    if group_size < 2:
        return []
    if pairs == "all":
        out = list(itertools.combinations(range(group_size), 2))
    else:
        out = [(i, (i + 1) % group_size) for i in range(group_size)]
    return out + [(j, i) for i, j in out] if swap else out


def aggregate_group(comparisons: Sequence[tuple[int, int, Comparison | None]], reasoning_lengths: Sequence[float],
                    answer_lengths: Sequence[float], *,
                    coefficients: PairwiseCoefficients = PairwiseCoefficients()) -> np.ndarray:
    """One group's rewards [G] from its comparisons `(i, j, (s1, s2, ranking) or None)`, training.md §2.5.

    1. Tie-break: when s1 == s2, d = 3.5 - ranking, s1 += d, s2 -= d.
    2. Base score = the mean of a response's scores over the comparisons it appears in. A failed comparison
       (None) is left out. A response with no successful comparison gets the mean of the others' base scores
       (no advantage either way); a group with no successful comparison at all gets 0 for everyone, with no
       bonus and no length term (the length terms adjust the judge's verdict, they are not a reward alone).
    3. Bonuses: the top max(1, floor(G * top_percentile)) base scores are eligible (ties with the last one
       included); among them the shortest non-empty reasoning gets +reasoning_bonus and the shortest non-empty
       answer +answer_bonus (first index on ties). NeMo-Gym gives the bonus to the group's shortest only when it
       is also a top scorer; this follows §2.5's "among the top scorers".
    4. Length terms, for every response: w_k = (1 - (L_k - L_min) / (L_max - L_min)) - mean(w) (all 0 when
       L_max == L_min), score += reasoning_length_coef * w_reasoning + answer_length_coef * w_answer.
    The optional style-density penalty is not implemented.
    """
    c = coefficients
    reasoning = np.asarray(reasoning_lengths, dtype=np.float64)
    answer = np.asarray(answer_lengths, dtype=np.float64)
    size = len(reasoning)
    if reasoning.shape != (size,) or answer.shape != (size,):
        raise ValueError(f"aggregate_group: expected two length vectors of one size, got {reasoning.shape} "
                         f"and {answer.shape}")
    total, count = np.zeros(size), np.zeros(size)
    for i, j, result in comparisons:
        if not (0 <= i < size and 0 <= j < size and i != j):
            raise ValueError(f"aggregate_group: comparison ({i}, {j}) is not a pair of a group of {size}")
        if result is None:
            continue
        s1, s2, ranking = (float(v) for v in result)
        if s1 == s2:
            d = RANKING_MIDPOINT - ranking
            s1, s2 = s1 + d, s2 - d
        total[i] += s1
        total[j] += s2
        count[i] += 1
        count[j] += 1
    if not count.any():
        return np.zeros(size)
    judged = count > 0
    base = np.zeros(size)
    base[judged] = total[judged] / count[judged]
    base[~judged] = base[judged].mean()

    scores = base.copy()
    top_k = max(1, int(size * c.top_percentile + 1e-9))
    top = base >= np.sort(base)[::-1][top_k - 1]
    for lengths, bonus in ((reasoning, c.reasoning_bonus), (answer, c.answer_bonus)):
        eligible = top & (lengths > 0)
        if bonus and eligible.any():
            scores[int(np.argmin(np.where(eligible, lengths, np.inf)))] += bonus
    return scores + c.reasoning_length_coef * length_weights(reasoning) + c.answer_length_coef * length_weights(answer)


def length_weights(lengths: Sequence[float]) -> np.ndarray:
    """Zero-centred group-relative weights, shorter = higher: 1 - (L - L_min) / (L_max - L_min), minus their
    mean; all 0 when every length is the same."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if lengths.size == 0 or lengths.max() == lengths.min():
        return np.zeros(lengths.shape)
    raw = 1.0 - (lengths - lengths.min()) / (lengths.max() - lengths.min())
    return raw - raw.mean()


class PairwiseJudge:
    """Group rewards from a pairwise judge behind an OpenAI-compatible endpoint, through `JudgeClient`'s
    requests, retries, timeouts and bounded concurrency (all comparisons of a call are in flight together, at
    most `config.max_concurrency` at a time)."""

    def __init__(self, config: JudgeConfig, coefficients: PairwiseCoefficients = PairwiseCoefficients(),
                 pairs: str = "all", swap: bool = False):
        if not isinstance(coefficients, PairwiseCoefficients):
            raise ValueError(f"PairwiseJudge: expected PairwiseCoefficients, got {type(coefficients).__name__}")
        comparison_pairs(2, pairs)   # validates `pairs`
        self.client = JudgeClient(config)
        self.coefficients, self.pairs, self.swap = coefficients, pairs, bool(swap)

    def group_rewards(self, prompts: Sequence[str], responses: Sequence[str],
                      group_size: int) -> tuple[list[float], dict[str, int]]:
        """Rewards for `responses`, whose consecutive runs of `group_size` answer one prompt each; `prompts`
        holds one prompt text per response (the group's first is used) or one per group. Counts: one outcome
        per comparison."""
        responses = list(responses)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size: expected an int >= 1, got {group_size!r}")
        if len(responses) % group_size:
            raise ValueError(f"group_size: {len(responses)} responses do not split into groups of {group_size}")
        groups = len(responses) // group_size
        if len(prompts) == len(responses):
            group_prompts = [prompts[g * group_size] for g in range(groups)]
        elif len(prompts) == groups:
            group_prompts = list(prompts)
        else:
            raise ValueError(f"prompts: expected {len(responses)} (one per response) or {groups} (one per group), "
                             f"got {len(prompts)}")
        splits = [split_response(r) for r in responses]
        shown = [answer.strip() or EMPTY_ANSWER for _, answer in splits]
        pairs = comparison_pairs(group_size, self.pairs, self.swap)
        messages = [render_comparison(group_prompts[g], shown[g * group_size + i], shown[g * group_size + j])
                    for g in range(groups) for i, j in pairs]
        texts, details, _ = self.client.complete(messages)

        counts = dict.fromkeys(OUTCOMES, 0)
        results: list[Comparison | None] = []
        for text, d in zip(texts, details):
            result = parse_comparison(text) if text is not None else None
            outcome = "malformed" if text is not None and result is None else d["outcome"]
            counts[outcome] += 1
            results.append(result)

        rewards: list[float] = []
        for g in range(groups):
            members = range(g * group_size, (g + 1) * group_size)
            lengths = [(len(reasoning.strip()), len(answer.strip())) for reasoning, answer in
                       (splits[k] for k in members)]
            done = results[g * len(pairs):(g + 1) * len(pairs)]
            rewards += aggregate_group([(i, j, r) for (i, j), r in zip(pairs, done)],
                                       [r for r, _ in lengths], [a for _, a in lengths],
                                       coefficients=self.coefficients).tolist()
        return rewards, counts


def _clamp(value: float, low: float, high: float) -> float:
    return min(float(high), max(float(low), value))
