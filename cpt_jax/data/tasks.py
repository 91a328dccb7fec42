"""The task registry: the paper's seven stages and three general benchmarks, the offline
synthetic benchmark that mirrors them, the prompt suffixes, and answer normalisation.

Every task shares one reward (EasyR1's math reward, `cpt_jax.rewards`), as in the paper;
`answer_type` only decides how `normalize_answer` canonicalises a reply for comparison.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from cpt_jax.rewards import compute_score, compute_score_no_cot

AnswerType = Literal["letter", "phrase", "number", "yesno", "word"]
Role = Literal["stage", "general", "pretrain"]
ScoreFn = Callable[[list[str], list[str]], list[dict[str, float]]]

# EasyR1's format prompt (`{{ content | trim }}` followed by this suffix), as the paper used it.
COT_SUFFIX = (
    " You FIRST think about the reasoning process as an internal monologue and then provide"
    " the final answer. The reasoning process MUST BE enclosed within <think> </think> tags."
    " The final answer MUST BE put in \\boxed{}."
)
NO_COT_SUFFIX = " You MUST provide the final answer directly."


@dataclass(frozen=True)
class Task:
    """One task: its name, the paper task it is (or stands in for), and its answer kind."""

    name: str
    paper_task: str
    answer_type: AnswerType
    role: Role
    description: str

    def __post_init__(self) -> None:
        """Reject kinds the Literal types cannot enforce at run time."""
        if self.answer_type not in get_args(AnswerType):
            raise ValueError(f"answer_type {self.answer_type!r} not in {get_args(AnswerType)}")
        if self.role not in get_args(Role):
            raise ValueError(f"role {self.role!r} not in {get_args(Role)}")


PAPER_STAGES = ("scienceqa", "textvqa", "vizwiz", "gqa", "geometry3k", "pathvqa", "superclevr")
PAPER_GENERAL = ("mmmu", "mmlu_pro", "pope")
SYNTHETIC_STAGES = (
    "syn_choice",
    "syn_ocr",
    "syn_unanswerable",
    "syn_spatial",
    "syn_geometry",
    "syn_texture",
    "syn_count",
)
SYNTHETIC_GENERAL = ("syn_general_pope", "syn_general_arith")
# Dense supervision for a base model trained from scratch; no stage trains on it.
SYNTHETIC_PRETRAIN = ("syn_caption",)

_ALL = (
    # The paper's stages, in training order.
    Task("scienceqa", "scienceqa", "letter", "stage", "science multiple choice; option letter"),
    Task("textvqa", "textvqa", "phrase", "stage", "read text in the image; prompt has OCR tokens"),
    Task("vizwiz", "vizwiz", "phrase", "stage", "photos by blind users; 'Unanswerable' allowed"),
    Task("gqa", "gqa", "phrase", "stage", "compositional scene questions; short phrase"),
    Task("geometry3k", "geometry3k", "number", "stage", "geometry problems; numeric answer"),
    Task("pathvqa", "pathvqa", "yesno", "stage", "pathology images; mostly yes/no"),
    Task("superclevr", "superclevr", "phrase", "stage", "3-D scenes; colour, count or true/false"),
    # The paper's general-ability benchmarks.
    Task("mmmu", "mmmu", "letter", "general", "college-level multimodal multiple choice"),
    Task("mmlu_pro", "mmlu_pro", "letter", "general", "text-only multiple choice, options A-J"),
    Task("pope", "pope", "yesno", "general", "object hallucination: is there a X in the image?"),
    # Synthetic analogues, stage by stage (generators in cpt_jax/data/synthetic.py).
    Task("syn_choice", "scienceqa", "letter", "stage", "multiple choice about a drawn scene"),
    Task("syn_ocr", "textvqa", "word", "stage", "read the word rendered in the image"),
    Task("syn_unanswerable", "vizwiz", "phrase", "stage", "colour question; may be unanswerable"),
    Task("syn_spatial", "gqa", "phrase", "stage", "spatial relation between two shapes"),
    Task("syn_geometry", "geometry3k", "number", "stage", "count the sides of a drawn polygon"),
    Task("syn_texture", "pathvqa", "yesno", "stage", "yes/no about a texture pattern"),
    Task("syn_count", "superclevr", "number", "stage", "count the red shapes (or all shapes)"),
    Task("syn_general_pope", "pope", "yesno", "general", "does an object of a kind exist?"),
    Task("syn_general_arith", "mmlu_pro", "letter", "general", "text-only arithmetic choice"),
    Task("syn_caption", "none", "phrase", "pretrain", "describe the scene, tile or word"),
)
TASKS: dict[str, Task] = {task.name: task for task in _ALL}


def get_task(name: str) -> Task:
    """The registered task called `name`; unknown names fail listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def _resolve(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def prompt_text(task: Task | str, problem: str, cot: bool = True) -> str:
    """The user turn: the trimmed problem (EasyR1's `content | trim`) and the suffix.

    The paper uses one template for every task; `task` is resolved so a wrong name fails
    here. The `<image>` placeholder is left in place for the processor to expand.
    """
    _resolve(task)
    return problem.strip() + (COT_SUFFIX if cot else NO_COT_SUFFIX)


def reward_fn(task: Task | str, cot: bool = True) -> ScoreFn:
    """The scoring function for a task: the paper's CoT reward, or the no-CoT accuracy reward.

    All tasks share it in the paper; `task` is resolved so a wrong name fails here.
    """
    _resolve(task)
    return compute_score if cot else compute_score_no_cot


_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)]|\s|$)")
_INT_FLOAT = re.compile(r"^(-?\d+)\.0+$")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# Punctuation, except a '.' or ',' between two digits (decimals, thousands).
_PUNCT = re.compile(r"(?<!\d)[.,]|[.,](?!\d)|[^\w\s.,]|_")


def normalize_answer(task: Task | str, text: str) -> str:
    """Canonical form of an answer for comparison, by the task's answer type.

    letter: the option letter, upper-case ("(b)", "B.", "B) red" -> "B"), else the
      stripped text;
    yesno, word: lower-case, surrounding whitespace and punctuation stripped;
    number: stripped, thousands commas dropped, an integer written as "3.0" -> "3";
    phrase: VQA-style, kept modest: lower-case, punctuation to spaces (a '.' or ','
      between digits kept), the articles a/an/the dropped, whitespace collapsed (no
      number-word or contraction maps).
    """
    kind = _resolve(task).answer_type
    text = text.strip()
    if kind == "letter":
        match = _LETTER.match(text)
        return match.group(1).upper() if match else text
    if kind in ("yesno", "word"):
        return text.lower().strip(string.punctuation + string.whitespace)
    if kind == "number":
        text = _THOUSANDS.sub("", text)
        match = _INT_FLOAT.match(text)
        return match.group(1) if match else text
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split())
