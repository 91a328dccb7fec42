"""The paper's reward and the SFT metric, as pure string functions (no JAX).

The paper trained with EasyR1's math reward, `examples/reward_function/math.py` (the batch
form `compute_score(predicts, ground_truths, format_weight=0.1)` of EasyR1 v0.3.x, mid
2025; the body is unchanged in later releases that take `reward_inputs` dicts):

- the response is normalised first by deleting whitespace around `<`, `>` and `/`
  (EasyR1: "handle qwen2.5vl-32b format"); both format and accuracy read the normalised
  string, so spaces around a `/` inside the box are removed too;
- format = 1 when the whole normalised response fullmatches
  `<think>.*</think>.*\\boxed\\{.*\\}.*` (DOTALL): it must start with `<think>`, and any
  text may follow the box;
- accuracy = 1 when mathruler's `grade_answer` accepts the content of the LAST `\\boxed{}`
  (mathruler's `extract_boxed_content` searches from the right, balancing braces);
- overall = (1 - format_weight) * accuracy + format_weight * format.

Quirk kept for parity: with no closed box mathruler extracts the string "None", so a
ground truth that grades equal to "None" is scored correct for an unboxed response.
"""

from __future__ import annotations

import re

from mathruler.grader import extract_boxed_content, grade_answer

_TAG_SPACE = re.compile(r"\s*(<|>|/)\s*")
_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
_BOXED_NONE = re.compile(r"\\boxed\{\s*None\s*\}")
_NO_BOX = "None"  # what mathruler's extract_boxed_content returns when no box closes


def normalize_tags(predict: str) -> str:
    """Delete whitespace around `<`, `>`, `/`, as EasyR1 does before scoring (idempotent)."""
    return _TAG_SPACE.sub(r"\1", predict)


def format_reward(predict: str) -> float:
    """1.0 when the tag-normalised output is `<think>...</think>...\\boxed{...}...`."""
    return 1.0 if _FORMAT.fullmatch(normalize_tags(predict)) else 0.0


def accuracy_reward(predict: str, ground_truth: str) -> float:
    """1.0 when mathruler grades the last boxed answer of the tag-normalised output correct."""
    answer = extract_boxed_content(normalize_tags(predict))
    return 1.0 if grade_answer(answer, ground_truth) else 0.0


def compute_score(
    predicts: list[str], ground_truths: list[str], format_weight: float = 0.1
) -> list[dict[str, float]]:
    """EasyR1 `examples/reward_function/math.py` (v0.3.x batch form): one dict per answer.

    Unlike EasyR1's `zip`, lists of different lengths are an error rather than truncated.
    """
    scores = []
    for predict, ground_truth in zip(predicts, ground_truths, strict=True):
        fmt = format_reward(predict)
        acc = accuracy_reward(predict, ground_truth)
        overall = (1 - format_weight) * acc + format_weight * fmt
        scores.append({"overall": overall, "format": fmt, "accuracy": acc})
    return scores


def boxed_answer(text: str) -> str | None:
    """Content of the last `\\boxed{}` as mathruler reads it, or None when no box closes.

    mathruler signals "no box" with the string "None"; a box that really holds `None` is told
    apart by looking at the last `\\boxed{` itself.
    """
    content = extract_boxed_content(text)
    if content != _NO_BOX:
        return content
    start = text.rfind("\\boxed{")
    return content if start >= 0 and _BOXED_NONE.match(text, start) else None


def _direct_answer(predict: str) -> str:
    """The answer of a no-CoT output: the boxed content when a box closes, else the output."""
    boxed = boxed_answer(predict)
    return boxed if boxed is not None else predict.strip()


def compute_score_no_cot(predicts: list[str], ground_truths: list[str]) -> list[dict[str, float]]:
    """Accuracy-only reward of the paper's no-CoT ablation ("provide the final answer directly").

    The paper's code for this ablation is not public, and its prompt no longer asks for a box,
    so the answer is the last boxed content when a box closes, else the whole stripped output;
    either way it is graded by mathruler after the same tag normalisation as `compute_score`.
    `format` is the CoT format score, reported for monitoring with weight 0.
    """
    scores = []
    for predict, ground_truth in zip(predicts, ground_truths, strict=True):
        normalized = normalize_tags(predict)
        acc = 1.0 if grade_answer(_direct_answer(normalized), ground_truth) else 0.0
        scores.append({"overall": acc, "format": format_reward(normalized), "accuracy": acc})
    return scores


def exact_match(predict: str, answer: str) -> bool:
    """The paper's SFT metric: case-insensitive exact match after stripping both sides.

    The prediction is the last boxed content when a box closes, else the whole stripped
    output (SFT targets are bare answers, so a plain reply is compared as it is).
    """
    return _direct_answer(predict).strip().lower() == answer.strip().lower()
