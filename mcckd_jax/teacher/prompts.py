"""Prompt templates: how a question becomes the chat messages a teacher answers.

A template is a YAML file (the shipped ones live in `configs/prompts/`, named
`<task>_<name>.yaml`, e.g. `gsm8k_few_shot.yaml`) with these fields:

* `task` (optional): the task it was written for; loading it for another task is an error;
* `system` (optional): the system message;
* `examples` (optional): few-shot examples, each `question`, `rationale` and optionally
  `answer`; an example becomes one earlier user turn (the user template applied to its
  question) and one assistant turn (its rationale). When `answer` is given, the loader checks
  that `answers.extract_answer` reads exactly that answer from the rationale, so that the
  teacher imitates an ending the data pipeline parses;
* `user` (required): the user message, holding `{question}` exactly once.

The question is inserted by plain replacement of `{question}`, once: braces elsewhere in the
template or in the question are literal text. The messages are chat messages; the server (or
the local teacher's tokenizer) applies the model's chat template.

Every problem raises `PromptError`, one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import yaml

from mcckd_jax import config
from mcckd_jax.data import answers

PLACEHOLDER = "{question}"
# Shipped templates sit in the repository's configs/ (an editable install finds them; with a
# plain wheel install, pass the path of a template file instead of a name).
PROMPTS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / "prompts"
_FIELDS = ("task", "system", "examples", "user")
_EXAMPLE_FIELDS = ("question", "rationale", "answer")

Messages = tuple[tuple[str, str], ...]


class PromptError(ValueError):
    """A bad template; `str(error)` is one line: file, field and what was expected."""

    def __init__(self, path: str | os.PathLike, field: str | None, message: str):
        self.path, self.field = str(path), field
        self.message = " ".join(str(message).split())
        where = self.path if field is None else f"{self.path}, field '{field}'"
        super().__init__(f"{where}: {self.message}")


@dataclasses.dataclass(frozen=True)
class Example:
    """A worked few-shot example."""

    question: str
    rationale: str  # ends with a sentence `answers.extract_answer` reads
    answer: str | None = None  # the answer the rationale states, checked when loading


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """A loaded template (see the module docstring)."""

    user: str  # holds PLACEHOLDER exactly once
    system: str | None = None
    examples: tuple[Example, ...] = ()
    task: str | None = None
    source: str = ""  # the file it was read from

    def __post_init__(self):
        if self.user.count(PLACEHOLDER) != 1:
            raise ValueError(f"the user message must hold {PLACEHOLDER} exactly once, found "
                             f"it {self.user.count(PLACEHOLDER)} times")

    def messages(self, question: str) -> Messages:
        """(role, content) chat messages asking `question`: system, examples, the question."""
        turns: list[tuple[str, str]] = []
        if self.system:
            turns.append(("system", self.system))
        for example in self.examples:
            turns.append(("user", self.user.replace(PLACEHOLDER, example.question)))
            turns.append(("assistant", example.rationale))
        turns.append(("user", self.user.replace(PLACEHOLDER, question)))
        return tuple(turns)


def prompt_names(task: str) -> list[str]:
    """Names of the shipped templates for `task` ("few_shot", "zero_shot", ...)."""
    answers.check_task(task)
    prefix = f"{task}_"
    return sorted(path.stem[len(prefix):] for path in PROMPTS_DIR.glob(f"{prefix}*.yaml"))


def prompt_path(name_or_path: str | os.PathLike, task: str) -> pathlib.Path:
    """The file of a shipped template name, or `name_or_path` itself when it names a file."""
    text = os.fspath(name_or_path)
    if os.sep in text or "/" in text or text.endswith((".yaml", ".yml")):
        return pathlib.Path(text)
    answers.check_task(task)
    path = PROMPTS_DIR / f"{task}_{text}.yaml"
    if not path.is_file():
        known = ", ".join(prompt_names(task)) or "none"
        raise PromptError(path, None, f"no shipped prompt {text!r} for task {task} (shipped: "
                          f"{known}); pass a template file's path for your own")
    return path


def load_prompt(name_or_path: str | os.PathLike, task: str) -> PromptTemplate:
    """Reads and checks a template: a shipped name ("few_shot") or a YAML file's path."""
    answers.check_task(task)
    path = prompt_path(name_or_path, task)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise PromptError(path, None, f"cannot read the template ({reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PromptError(path, None, f"not valid YAML {config.yaml_problem(error)}") from None
    if not isinstance(data, Mapping):
        raise PromptError(path, None, "expected a mapping with the fields "
                          f"{', '.join(_FIELDS)}, got {type(data).__name__}")
    return _template(data, path, task)


def _template(data: Mapping[str, Any], path: pathlib.Path, task: str) -> PromptTemplate:
    _check_fields(data, _FIELDS, path, "")
    written_for = _optional_text(data, "task", path, "task")
    if written_for is not None and written_for != task:
        raise PromptError(path, "task", f"the template is written for {written_for}, not {task}")
    user = _text(data, "user", path, "user")
    if user.count(PLACEHOLDER) != 1:
        raise PromptError(path, "user", f"must hold {PLACEHOLDER} exactly once, found it "
                          f"{user.count(PLACEHOLDER)} times")
    raw_examples = data.get("examples") or []
    if not isinstance(raw_examples, list):
        raise PromptError(path, "examples", f"expected a list, got {type(raw_examples).__name__}")
    examples = tuple(_example(item, path, f"examples[{i}]", task)
                     for i, item in enumerate(raw_examples))
    return PromptTemplate(user=user, system=_optional_text(data, "system", path, "system"),
                          examples=examples, task=task, source=str(path))


def _example(item: Any, path: pathlib.Path, field: str, task: str) -> Example:
    if not isinstance(item, Mapping):
        raise PromptError(path, field, "expected a mapping with question, rationale and "
                          f"optionally answer, got {type(item).__name__}")
    _check_fields(item, _EXAMPLE_FIELDS, path, f"{field}.")
    question = _text(item, "question", path, f"{field}.question")
    rationale = _text(item, "rationale", path, f"{field}.rationale")
    answer = item.get("answer")
    if answer is None:
        return Example(question=question, rationale=rationale)
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise PromptError(path, f"{field}.answer", "expected a string or a number, got "
                          f"{type(answer).__name__}")
    answer = str(answer).strip()
    read = answers.extract_answer(rationale, task, question=question)
    if not answers.answers_match(read, answer, task):
        raise PromptError(path, f"{field}.answer", f"the rationale's final answer reads as "
                          f"{read!r}, not {answer!r}; end it with a sentence such as "
                          f"'Therefore, the answer is {answer}.'")
    return Example(question=question, rationale=rationale, answer=answer)


def _check_fields(data: Mapping[str, Any], known: tuple[str, ...], path, prefix: str) -> None:
    for key in data:
        if key not in known:
            raise PromptError(path, f"{prefix}{key}",
                              f"unknown field; expected one of {', '.join(known)}")


def _text(data: Mapping[str, Any], key: str, path, field: str) -> str:
    value = _optional_text(data, key, path, field)
    if value is None:
        raise PromptError(path, field, "missing")
    return value


def _optional_text(data: Mapping[str, Any], key: str, path, field: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PromptError(path, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise PromptError(path, field, "empty")
    return value.strip()
