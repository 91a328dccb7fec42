"""The task registry: names, prompt suffixes as the paper wrote them, answer normalisation."""

from __future__ import annotations

import pytest

from cpt_jax import rewards
from cpt_jax.data.tasks import (
    COT_SUFFIX,
    NO_COT_SUFFIX,
    PAPER_GENERAL,
    PAPER_STAGES,
    SYNTHETIC_GENERAL,
    SYNTHETIC_PRETRAIN,
    SYNTHETIC_STAGES,
    TASKS,
    Task,
    get_task,
    normalize_answer,
    prompt_text,
    reward_fn,
)

GROUPS = {
    "stage": (PAPER_STAGES, SYNTHETIC_STAGES),
    "general": (PAPER_GENERAL, SYNTHETIC_GENERAL),
    "pretrain": ((), SYNTHETIC_PRETRAIN),
}


def test_every_listed_name_resolves_with_its_role():
    listed = PAPER_STAGES + PAPER_GENERAL + SYNTHETIC_STAGES + SYNTHETIC_GENERAL
    listed += SYNTHETIC_PRETRAIN
    assert sorted(listed) == sorted(TASKS)
    for role, groups in GROUPS.items():
        for name in groups[0] + groups[1]:
            task = get_task(name)
            assert task.name == name
            assert task.role == role
            assert task.answer_type in {"letter", "phrase", "number", "yesno", "word"}


def test_synthetic_tasks_mirror_the_paper_in_order():
    assert [get_task(n).paper_task for n in SYNTHETIC_STAGES] == list(PAPER_STAGES)
    assert [get_task(n).paper_task for n in SYNTHETIC_GENERAL] == ["pope", "mmlu_pro"]
    kinds = [get_task(n).answer_type for n in SYNTHETIC_STAGES + SYNTHETIC_GENERAL]
    assert kinds == [
        "letter", "word", "phrase", "phrase", "number", "yesno", "number", "yesno", "letter",
    ]  # fmt: skip


def test_paper_answer_types():
    kinds = {name: get_task(name).answer_type for name in PAPER_STAGES + PAPER_GENERAL}
    assert kinds["scienceqa"] == kinds["mmlu_pro"] == kinds["mmmu"] == "letter"
    assert kinds["geometry3k"] == "number"
    assert kinds["pathvqa"] == kinds["pope"] == "yesno"


def test_task_is_frozen():
    with pytest.raises(AttributeError):
        get_task("gqa").name = "other"  # type: ignore[misc]


def test_unknown_task_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown task 'nope'") as info:
        get_task("nope")
    for name in TASKS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="known tasks"):
        prompt_text("nope", "q")


def test_suffixes_are_the_papers_words():
    assert COT_SUFFIX == (
        " You FIRST think about the reasoning process as an internal monologue and then "
        "provide the final answer. The reasoning process MUST BE enclosed within "
        "<think> </think> tags. The final answer MUST BE put in \\boxed{}."
    )
    assert NO_COT_SUFFIX == " You MUST provide the final answer directly."


def test_prompt_text():
    problem = "<image>What colour is the car?\nA. red\nB. blue"
    assert prompt_text("scienceqa", problem) == problem + COT_SUFFIX
    assert prompt_text(get_task("scienceqa"), problem, cot=False) == problem + NO_COT_SUFFIX
    # EasyR1's template trims the problem; the <image> placeholder stays for the processor.
    assert prompt_text("pope", "  <image>Is there a dog?\n") == (
        "<image>Is there a dog?" + COT_SUFFIX
    )


def test_reward_fn():
    for name in TASKS:
        assert reward_fn(name) is rewards.compute_score
        assert reward_fn(name, cot=False) is rewards.compute_score_no_cot
    with pytest.raises(ValueError):
        reward_fn("nope")


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("scienceqa", "B", "B"),
        ("scienceqa", "b", "B"),
        ("scienceqa", "(B)", "B"),
        ("scienceqa", "B.", "B"),
        ("scienceqa", " B) red ", "B"),
        ("scienceqa", "B. red", "B"),
        ("syn_general_arith", "(c)", "C"),
        ("mmlu_pro", "J", "J"),
        ("scienceqa", "Bed", "Bed"),  # not an option letter: left as stripped text
        ("pope", "Yes", "yes"),
        ("pope", " NO. ", "no"),
        ("pathvqa", "yes!", "yes"),
        ("syn_ocr", "Hello", "hello"),
        ("syn_ocr", '"STOP".', "stop"),
        ("geometry3k", " 3.0 ", "3"),
        ("geometry3k", "3.50", "3.50"),
        ("geometry3k", "-12.00", "-12"),
        ("geometry3k", "1,234", "1234"),
        ("geometry3k", "\\frac{1}{2}", "\\frac{1}{2}"),
        ("syn_count", "7", "7"),
        ("vizwiz", "Unanswerable", "unanswerable"),
        ("vizwiz", "The red car.", "red car"),
        ("gqa", "on the left of", "on left of"),
        ("textvqa", "Coca-Cola", "coca cola"),
        ("textvqa", "3.5 oz", "3.5 oz"),
        ("syn_spatial", "  Above  ", "above"),
        ("superclevr", "An  Apple", "apple"),
    ],
)
def test_normalize_answer(name: str, text: str, expected: str):
    assert normalize_answer(name, text) == expected


def test_normalize_accepts_a_task_object():
    task = Task("custom", "gqa", "yesno", "stage", "not registered")
    assert normalize_answer(task, "YES") == "yes"


def test_task_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="answer_type"):
        Task("t", "gqa", "float", "stage", "")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role"):
        Task("t", "gqa", "yesno", "eval", "")  # type: ignore[arg-type]
