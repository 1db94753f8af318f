"""Prompt templates: every shipped one loads and formats real questions; its worked examples do
their arithmetic right and end with an answer the data pipeline reads; bad files give one-line
errors naming the file and the field.

Independent references: the arithmetic of each example is recomputed here with exact fractions
from the equations its rationale writes ("14 * 3 = 42"); mcckd-prepare's answer-sentence check
(`prepare.with_answer_sentence`) must keep each rationale's ending as it is.
"""

import ast
import fractions
import operator
import re

import pytest

from mcckd_jax.data import answers, prepare, records
from mcckd_jax.teacher import prompts

SHIPPED = sorted(prompts.PROMPTS_DIR.glob("*.yaml"))
# A real question per task from ../shared/data (MultiArith and StrategyQA are not there: SVAMP's
# dev split stands in for MultiArith's one- and two-step arithmetic, and StrategyQA gets a
# question written here).
QUESTION_FILES = {"gsm8k": "gsm8k/test.jsonl", "svamp": "mcckd_format/SVAMP/test.json",
                  "asdiv": "mcckd_format/ASDiv/test.json",
                  "multiarith": "mcckd_format/SVAMP/dev.json",
                  "csqa": "mcckd_format/CSQA/test.json"}
STRATEGYQA_QUESTION = "Could a house cat fit inside a standard coffee mug?"
_EQUATION = re.compile(r"((?:\d+(?:\.\d+)?\s*[-+*/]\s*)+\d+(?:\.\d+)?)\s*=\s*\$?(\d+(?:\.\d+)?)")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv}


def _task_and_name(path):
    task = next(t for t in answers.TASKS if path.stem.startswith(f"{t}_"))
    return task, path.stem[len(task) + 1:]


def _exact(node):
    if isinstance(node, ast.Constant):
        return fractions.Fraction(str(node.value))
    return _OPERATORS[type(node.op)](_exact(node.left), _exact(node.right))


def _equations(text):
    """(left side's exact value, right side) of each "a op b = c" written in `text`."""
    return [(_exact(ast.parse(left, mode="eval").body), fractions.Fraction(right))
            for left, right in _EQUATION.findall(text)]


def _question(shared_data, task):
    if task == "strategyqa":
        return STRATEGYQA_QUESTION
    return records.read_records(shared_data / QUESTION_FILES[task]).records[3].question


def test_every_task_ships_a_zero_shot_and_a_few_shot_template():
    assert {path.stem for path in SHIPPED} == {f"{task}_{name}" for task in answers.TASKS
                                                for name in ("zero_shot", "few_shot")}
    for task in answers.TASKS:
        assert prompts.prompt_names(task) == ["few_shot", "zero_shot"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_template_formats_a_real_question(path, shared_data):
    task, name = _task_and_name(path)
    template = prompts.load_prompt(name, task)
    assert template == prompts.load_prompt(path, task)  # by name or by path: the same
    question = _question(shared_data, task)
    messages = template.messages(question)
    roles = [role for role, _ in messages]
    assert roles == ["system"] + ["user", "assistant"] * len(template.examples) + ["user"]
    assert (name == "few_shot") == (2 <= len(template.examples) <= 4)
    last = messages[-1][1]
    assert last.count(question) == 1 and "{question}" not in last
    assert "Let's think step by step" in last
    assert "Therefore, the answer is" in messages[0][1]  # the system message asks for it
    for (_, asked), example in zip(messages[1::2], template.examples):
        assert example.question in asked


@pytest.mark.parametrize("path", [p for p in SHIPPED if "few_shot" in p.stem],
                         ids=lambda p: p.stem)
def test_worked_examples_are_right_and_end_with_a_readable_answer(path):
    task, name = _task_and_name(path)
    for example in prompts.load_prompt(name, task).examples:
        equations = _equations(example.rationale)
        assert all(left == right for left, right in equations), (example.rationale, equations)
        if task in answers.NUMERIC_TASKS:
            assert equations and equations[-1][1] == fractions.Fraction(example.answer)
        read = answers.extract_answer(example.rationale, task, question=example.question)
        assert read == answers.normalize_label(example.answer, task)
        _, action = prepare.with_answer_sentence(example.rationale, read,
                                                 prepare.DEFAULT_ANSWER_TEMPLATE, task)
        assert action == "kept"


def test_the_arithmetic_check_catches_a_wrong_sum():
    assert _equations("Together the bakery made 42 + 50 = $92.") == [(92, 92)]
    left, right = _equations("Together the bakery made 42 + 50 = $93.")[0]
    assert left != right


def test_question_is_inserted_once_and_literally():
    example = prompts.Example(question="Is {y} a set?", rationale="Therefore, the answer is yes.")
    template = prompts.PromptTemplate(user="Q: {question}\nA: {answer}?", system="S",
                                      examples=(example,))
    question = "What is {x} + {question}?"
    assert template.messages(question) == (
        ("system", "S"), ("user", "Q: Is {y} a set?\nA: {answer}?"),
        ("assistant", "Therefore, the answer is yes."),
        ("user", "Q: What is {x} + {question}?\nA: {answer}?"))


def _write(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,field,says", [
    ("system: hi\n", "user", "missing"),
    ("user: 'no placeholder'\n", "user", "exactly once"),
    ("user: '{question} and {question}'\n", "user", "exactly once"),
    ("user: '{question}'\nsytem: typo\n", "sytem", "unknown field"),
    ("user: '{question}'\nsystem: [1, 2]\n", "system", "expected a string"),
    ("user: '{question}'\nexamples: {question: q}\n", "examples", "expected a list"),
    ("user: '{question}'\nexamples:\n  - question: q\n", "examples[0].rationale", "missing"),
    ("user: '{question}'\nexamples:\n  - question: q\n    rationale: r\n    note: x\n",
     "examples[0].note", "unknown field"),
    ("user: '{question}'\nexamples:\n  - question: How many?\n    rationale: 2 + 2 = 4. "
     "Therefore, the answer is 4.\n    answer: 5\n", "examples[0].answer", "reads as '4'"),
    ("task: csqa\nuser: '{question}'\n", "task", "written for csqa, not gsm8k"),
])
def test_bad_template_is_a_one_line_error_naming_file_and_field(tmp_path, text, field, says):
    path = _write(tmp_path, text)
    with pytest.raises(prompts.PromptError) as caught:
        prompts.load_prompt(path, "gsm8k")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and f"field '{field}'" in message
    assert says in message


@pytest.mark.parametrize("text,says", [
    ("user: '{question}\n  - broken: [\n", "not valid YAML at line"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_unreadable_template_is_a_one_line_error_naming_the_file(tmp_path, text, says):
    path = _write(tmp_path, text)
    with pytest.raises(prompts.PromptError) as caught:
        prompts.load_prompt(path, "gsm8k")
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    assert says in str(caught.value)


def test_unknown_name_lists_the_shipped_ones():
    with pytest.raises(prompts.PromptError) as caught:
        prompts.load_prompt("five_shot", "svamp")
    assert "svamp_five_shot.yaml" in str(caught.value)
    assert "few_shot, zero_shot" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="unknown task"):
        prompts.load_prompt("few_shot", "mathqa")
