"""The reward against a transcription of EasyR1's, on outputs a policy really produces.

Parity alone could pass by comparing a function with itself, so absolute expectations pin
the numbers the paper's reward gives (1.0 perfect, 0.9 correct without tags, 0.1 wrong).
"""

from __future__ import annotations

import re

import pytest
from mathruler.grader import extract_boxed_content, grade_answer

from cpt_jax.rewards import (
    accuracy_reward,
    boxed_answer,
    compute_score,
    compute_score_no_cot,
    exact_match,
    format_reward,
    normalize_tags,
)


# Transcribed from EasyR1 `examples/reward_function/math.py` as read at hiyouga/EasyR1 commit
# 51636b22a626840b938b1819b56030b5e93963c3, written in the list form
# `compute_score(predicts, ground_truths, format_weight=0.1)` that EasyR1 v0.3.x (mid 2025)
# used before it switched to `reward_inputs` dicts; the scoring body is the same in both.
def _easyr1_format_reward(predict: str) -> float:
    pattern = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
    format_match = re.fullmatch(pattern, predict)
    return 1.0 if format_match else 0.0


def _easyr1_accuracy_reward(predict: str, ground_truth: str) -> float:
    answer = extract_boxed_content(predict)
    return 1.0 if grade_answer(answer, ground_truth) else 0.0


def _easyr1_compute_score(
    predicts: list[str], ground_truths: list[str], format_weight: float = 0.1
) -> list[dict[str, float]]:
    scores = []
    for predict, ground_truth in zip(predicts, ground_truths, strict=True):
        predict = re.sub(r"\s*(<|>|/)\s*", r"\1", predict)  # handle qwen2.5vl-32b format
        format_score = _easyr1_format_reward(predict)
        accuracy_score = _easyr1_accuracy_reward(predict, ground_truth)
        scores.append(
            {
                "overall": (1 - format_weight) * accuracy_score + format_weight * format_score,
                "format": format_score,
                "accuracy": accuracy_score,
            }
        )
    return scores


T = "<think>reasoning</think>"

# (model output, ground truth)
CASES = [
    # tags
    (T + r"\boxed{B}", "B"),
    (r"\boxed{B}", "B"),  # no think tags
    (T + r"\boxed{C}", "B"),  # well formed, wrong
    (T, "B"),  # only the think block
    (r"<think>reasoning \boxed{B}", "B"),  # <think> never closed
    (r"reasoning</think>\boxed{B}", "B"),  # no opening <think>
    (r"Sure. <think>r</think>\boxed{B}", "B"),  # text before <think>
    (T + r"\boxed{B}. So the answer is B.", "B"),  # text after the box
    (r"\boxed{B}<think>r</think>", "B"),  # box before the think block
    (r"< think >r< / think >\boxed{B}", "B"),  # spaces inside tags
    (r"<think>r</ think>  \boxed{B}", "B"),
    ("<think>\nline one\nline two\n</think>\n\n\\boxed{B}\n", "B"),  # newlines
    (r"<THINK>r</THINK>\boxed{B}", "B"),  # tags are case-sensitive
    (r"<think></think>\boxed{B}", "B"),  # empty think block
    (r"<think><think>r</think></think>\boxed{B}", "B"),
    ("", "B"),  # empty output
    # boxes
    (T + r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (T + r"\boxed{1}, no wait \boxed{2}", "2"),  # two boxes: the last is graded
    (T + r"\boxed{1}, no wait \boxed{2}", "1"),
    (T + r"\boxed{}", "0"),  # empty box
    (T + r"\boxed{B", "B"),  # box never closed
    (T + r"\boxed{\boxed{5}}", "5"),  # box in a box
    (T + r"\fbox{5}", "5"),  # not a \boxed
    (T + r"$\boxed{5}$", "5"),
    (T + r"\boxed{\text{B}}", "B"),
    (T + r"\boxed{ 42 }", "42"),
    # numbers
    (T + r"\boxed{\frac{1}{2}}", "0.5"),  # fraction vs decimal
    (T + r"\boxed{0.5}", r"\frac{1}{2}"),
    (T + r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}"),
    (T + r"\boxed{2/4}", "1/2"),  # unreduced fraction
    (T + r"\boxed{1 / 2}", r"\frac{1}{2}"),  # '/' spacing is normalised inside the box too
    (T + r"\boxed{42.0}", "42"),
    (T + r"\boxed{3.14}", "3.14159"),
    (T + r"\boxed{1,000}", "1000"),  # thousands comma
    (T + r"\boxed{1,234,567}", "1234567"),
    (T + r"\boxed{3,5}", "3.5"),  # decimal comma
    (T + r"\boxed{-3}", "-3"),
    (T + r"\boxed{- 3}", "-3"),
    (T + r"\boxed{-0.5}", r"-\frac{1}{2}"),
    (T + r"\boxed{50\%}", "50"),  # percent
    (T + r"\boxed{50%}", "0.5"),
    (T + r"\boxed{5 cm}", "5"),  # units
    (T + r"\boxed{30^\circ}", "30"),
    (T + r"\boxed{2 apples}", "2"),
    (T + r"\boxed{x=5}", "5"),
    # letters and words
    (T + r"\boxed{B}", "(B)"),
    (T + r"\boxed{(B)}", "B"),
    (T + r"\boxed{B. red}", "B"),
    (T + r"\boxed{Option B}", "B"),
    (T + r"\boxed{b}", "B"),
    (T + r"\boxed{Unanswerable}", "unanswerable"),
    (T + r"\boxed{unanswerable}", "Unanswerable"),
    (T + r"\boxed{Yes}", "yes"),
    (T + r"\boxed{NO}", "no"),
    (T + r"\boxed{No.}", "no"),
    (T + r"\boxed{Red Car}", "red car"),
    (T + r"\boxed{a < b}", "a<b"),
    # no box at all: mathruler extracts the string "None"
    ("The answer is B.", "B"),
    ("I cannot tell.", "None"),
]


def test_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("predict, truth", CASES)
def test_parity_with_easyr1(predict: str, truth: str):
    [ours] = compute_score([predict], [truth])
    [theirs] = _easyr1_compute_score([predict], [truth])
    assert ours == theirs


def test_parity_as_a_batch_and_with_another_weight():
    predicts, truths = zip(*CASES, strict=True)
    assert compute_score(list(predicts), list(truths)) == _easyr1_compute_score(
        list(predicts), list(truths)
    )
    assert compute_score(list(predicts), list(truths), format_weight=0.5) == (
        _easyr1_compute_score(list(predicts), list(truths), format_weight=0.5)
    )


def _score(predict: str, truth: str) -> dict[str, float]:
    return compute_score([predict], [truth])[0]


@pytest.mark.parametrize(
    "predict, truth, overall, fmt, acc",
    [
        (T + r"\boxed{B}", "B", 1.0, 1.0, 1.0),  # perfect
        (r"\boxed{B}", "B", 0.9, 0.0, 1.0),  # correct, no think tags
        (T + r"\boxed{C}", "B", 0.1, 1.0, 0.0),  # well formed, wrong
        (T, "B", 0.0, 0.0, 0.0),
        (T + r"\boxed{B}. Done.", "B", 1.0, 1.0, 1.0),  # text after the box is allowed
        (r"Sure. <think>r</think>\boxed{B}", "B", 0.9, 0.0, 1.0),  # must start with <think>
        (r"< think >r< / think >\boxed{B}", "B", 1.0, 1.0, 1.0),
        (T + r"\boxed{1} or \boxed{2}", "2", 1.0, 1.0, 1.0),  # the last box counts
        (T + r"\boxed{1} or \boxed{2}", "1", 0.1, 1.0, 0.0),
        (T + r"\boxed{\frac{1}{2}}", "0.5", 1.0, 1.0, 1.0),
        (T + r"\boxed{No.}", "no", 0.1, 1.0, 0.0),  # a trailing full stop is wrong
        ("I cannot tell.", "None", 0.9, 0.0, 1.0),  # mathruler's "None" sentinel, kept
    ],
)
def test_absolute_scores(predict: str, truth: str, overall: float, fmt: float, acc: float):
    score = _score(predict, truth)
    assert score["overall"] == pytest.approx(overall)
    assert (score["format"], score["accuracy"]) == (fmt, acc)


def test_parts_agree_with_compute_score():
    for predict, truth in CASES:
        score = _score(predict, truth)
        assert score["format"] == format_reward(predict)
        assert score["accuracy"] == accuracy_reward(predict, truth)


def test_normalize_tags_is_idempotent():
    for predict, _ in CASES:
        once = normalize_tags(predict)
        assert normalize_tags(once) == once
    assert normalize_tags("< think >a < / think >") == "<think>a</think>"


def test_lists_of_different_length_are_an_error():
    with pytest.raises(ValueError):
        compute_score(["a", "b"], ["a"])


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{B}", "B"),
        (r"\boxed{1} \boxed{ 2 }", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{None}", "None"),  # a real box holding None
        (r"\boxed{None} then \boxed{3", None),  # the last box never closes
        ("no box", None),
        (r"\boxed{B", None),
    ],
)
def test_boxed_answer(text: str, expected: str | None):
    assert boxed_answer(text) == expected


@pytest.mark.parametrize(
    "predict, truth, acc",
    [
        ("B", "B", 1.0),  # answered directly
        (" b\n", "B", 1.0),
        (r"\boxed{B}", "B", 1.0),  # a box is still read
        (r"The answer is \boxed{C}", "B", 0.0),
        ("The answer is B.", "B", 0.0),  # no box: the whole output is the answer
        ("0.5", r"\frac{1}{2}", 1.0),
        ("Unanswerable", "unanswerable", 1.0),
        ("yes", "no", 0.0),
        (T + r"\boxed{B}", "B", 1.0),
        ("", "B", 0.0),
    ],
)
def test_no_cot_reward_is_accuracy_only(predict: str, truth: str, acc: float):
    [score] = compute_score_no_cot([predict], [truth])
    assert score["overall"] == score["accuracy"] == acc
    assert score["format"] == format_reward(predict)


@pytest.mark.parametrize(
    "predict, answer, expected",
    [
        ("B", "B", True),
        ("  yes \n", "Yes", True),
        ("Unanswerable", "unanswerable", True),
        (r"<think>r</think>\boxed{Red}", "red", True),
        (r"\boxed{1} \boxed{2}", "2", True),
        ("B.", "B", False),  # exact: punctuation counts
        ("(B)", "B", False),
        ("0.5", "1/2", False),  # no maths equivalence
        ("red car", "red", False),
        (r"\boxed{B", "B", False),  # unclosed box: the whole output is compared
    ],
)
def test_exact_match(predict: str, answer: str, expected: bool):
    assert exact_match(predict, answer) is expected
