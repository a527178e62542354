"""Chat templates and what reaches them: a Jinja template file put on a tokenizer (``--chat-template``), the
per-row ``tools`` / ``documents`` / ``chat_template_kwargs`` columns turned into template arguments as TRL 1.x's
DPOTrainer passes them, and conversations rendered to token ids in batches of rows that share those arguments.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefdiag.errors import DataError, first_line


def load_chat_template(path: str | Path) -> str:
    """The text of a Jinja chat template file, checked to compile; a DataError names the file (and, for a syntax
    error, the line) when it is missing, unreadable, not UTF-8 or not valid Jinja."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"chat template {path}: no such file", hint="pass --chat-template with a Jinja file") from None
    except OSError as exc:  # a directory, no permission, an I/O error
        raise DataError(f"chat template {path}: cannot be read ({first_line(exc)})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"chat template {path}, line {line}: not UTF-8 text") from None
    if not text.strip():
        raise DataError(f"chat template {path}: the file is empty")
    _compile(text, path)
    return text


def use_chat_template(tokenizer, path: str | Path) -> str:
    """Put the chat template of ``path`` on the tokenizer (replacing any it has) and return the file's sha256,
    which the tokenization settings then record as ``chat_template_sha256`` (and the token cache key covers)."""
    text = load_chat_template(path)
    tokenizer.chat_template = text
    return hashlib.sha256(text.encode()).hexdigest()


def _compile(text: str, path: Path) -> None:
    import jinja2

    try:  # the environment transformers renders with (its extensions, e.g. {% generation %}, included)
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # pragma: no cover - an older or newer transformers without the private helper
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def compile_template(source):
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            return env.from_string(source)
    try:
        compile_template(text)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"chat template {path}, line {exc.lineno}: invalid Jinja ({exc.message})") from None
    except Exception as exc:  # ImportError for a missing jinja2 is not the file's fault, but say which file
        raise DataError(f"chat template {path}: cannot be compiled ({first_line(exc, with_type=True)})") from None


def _missing(value: Any) -> bool:
    """None, or the NaN a pandas column holds where a row has no value."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def row_template_kwargs(
    row: int,
    tools: Sequence[Any] | None,
    template_kwargs: Sequence[Any] | None,
) -> dict[str, Any]:
    """The chat-template arguments of one row, built as TRL 1.x's DPOTrainer builds them:
    ``{"tools": tools, **chat_template_kwargs}``, a JSON string in ``tools`` decoded first. Rows without either
    give ``{}`` (the template then renders exactly as without the columns)."""
    kwargs: dict[str, Any] = {}
    value = _cell(tools, row, "tools", list, "a list of function schemas")
    if value is not None:
        kwargs["tools"] = value
    extra = _cell(template_kwargs, row, "chat_template_kwargs", dict, "a mapping")
    if extra is not None:
        kwargs = {**kwargs, **extra}  # TRL: {"tools": tools, **chat_template_kwargs}
    return kwargs


def _cell(values: Sequence[Any] | None, row: int, column: str, kind: type, expected: str) -> Any:
    """One row's value of a JSON column (None when missing): a JSON string decoded, a numpy array (a parquet
    column) as a list, then checked to be of ``kind``."""
    value = None if values is None else values[row]
    if _missing(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"row {row + 1}, column '{column}': not valid JSON ({exc.msg})") from None
    if hasattr(value, "tolist") and not isinstance(value, (list, dict)):
        value = value.tolist()
    if not isinstance(value, kind):
        raise DataError(f"row {row + 1}, column '{column}': expected {expected}, got {type(value).__name__}")
    return value


def count_present(values: Sequence[Any] | None) -> int:
    """Rows of a per-row column that hold a value (not None / NaN, not an empty list)."""
    if values is None:
        return 0
    return sum(1 for v in values if not _missing(v) and not (hasattr(v, "__len__") and len(v) == 0))


def group_by_kwargs(rows: Sequence[int], kwargs: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], list[int]]]:
    """Rows that share identical template arguments, in first-seen order (each group renders in one batch)."""
    groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for row in rows:
        key = json.dumps(kwargs[row], sort_keys=True, default=repr)
        groups.setdefault(key, (kwargs[row], []))[1].append(row)
    return list(groups.values())


def chat_ids(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool, rows: list[int],
             kwargs: dict[str, Any] | None = None) -> list[list[int]]:
    """Token ids of each conversation: ``apply_chat_template`` on the whole batch, which renders each one and
    tokenizes them together (the same ids as one call per conversation, several times faster). A conversation the
    template rejects is named by its row."""
    kwargs = kwargs or {}

    def render(batch):
        return tokenizer.apply_chat_template(
            batch, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt, **kwargs
        )["input_ids"]

    try:
        return [list(ids) for ids in render(conversations)]
    except Exception:
        for row, conversation in zip(rows, conversations):
            try:
                render([conversation])
            except Exception as exc:
                raise _render_error(row, exc, "--tokenizer with another chat template") from None
        raise


def chat_text(tokenizer, conversation: list[dict], row: int, **kwargs) -> str:
    """One conversation rendered to text (``tokenize=False``); a template error names the row."""
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
    except Exception as exc:
        raise _render_error(row, exc, "--chat-template with another template") from None


def _render_error(row: int, exc: Exception, other: str) -> DataError:
    return DataError(
        f"row {row + 1}: the chat template cannot render this conversation ({first_line(exc, with_type=True)})",
        hint=f"check the roles and content of that row, or pass {other}",
    )
