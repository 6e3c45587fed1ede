"""Typing: mypy checks calls to a task against its function's signature (``Task[P, R]``)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

# The test extra installs mypy and django-stubs (the project's mypy plugin) in every env.
api = pytest.importorskip("mypy.api", reason="mypy is not installed: pip install -e .[test]")

REPO = Path(__file__).resolve().parents[1]

# A line marked "# E: …" must give one error containing that text, "# N: …" one note (a line
# may carry several marks); no other line may give anything.
SNIPPET = '''
from typing import Any

from django_tasks_q import AsyncResult, Task, task


@task
def add(a: int, b: int) -> int:
    return a + b


@task(queue="high", max_retries=5)
def greet(name: str, *, punctuation: str = "!") -> str:
    return name + punctuation


@task(bind=True)
def sync_order(self: Task[..., Any], order_id: int) -> str:
    return f"{order_id} after {self.request.retries} retries"


class ShopTask(Task[..., Any]):
    max_retries = 0


@task(base=ShopTask, bind=True)
def refund(self: ShopTask, order_id: int, amount: float = 0.0) -> None:
    self.update_state("PROGRESS", meta={"order": order_id})


flag = bool(len("x"))


@task(bind=flag)
def unknown_binding(x: int) -> int:
    return x


# Calls that match the signatures.
sent: AsyncResult = add.delay(1, 2)
total: int = add(1, 2)
later: AsyncResult = add.apply_async(args=(1, 2), countdown=10, queue="low")
greeted: AsyncResult = greet.delay("Ada", punctuation="?")
synced: AsyncResult = sync_order.delay(42)
inline: str = sync_order(42)
refund.delay(7, amount=9.5)
refund.delay(order_id=7)
unknown_binding.delay("anything", "goes")

reveal_type(add)  # N: "django_tasks_q.task.Task[[a: int, b: int], int]"
reveal_type(add.delay(1, 2))  # N: "django_tasks_q.results.AsyncResult"
reveal_type(add.apply_async((1, 2)))  # N: "django_tasks_q.results.AsyncResult"
reveal_type(sync_order)  # N: "django_tasks_q.task.Task[[order_id: int], str]"
reveal_type(refund)  # N: "django_tasks_q.task.Task[[order_id: int, amount: float =], None]"

# Calls that do not.
add.delay("x", 2)  # E: Argument 1 to "delay" of "Task" has incompatible type "str"; expected "int"
add.delay(1)  # E: Missing positional argument "b" in call to "delay" of "Task"  [call-arg]
add(1, 2, 3)  # E: Too many arguments for "__call__" of "Task"  [call-arg]
greet.delay("Ada", punct="?")  # E: Unexpected keyword argument "punct"  # N: "delay" defined
sync_order.delay(42, 43)  # E: Too many arguments for "delay" of "Task"  [call-arg]
sync_order("42")  # E: Argument 1 to "__call__" of "Task" has incompatible type "str"; expected
wrong: str = add(1, 2)  # E: (expression has type "int", variable has type "str")  [assignment]
refund.delay(amount=1.0)  # E: Missing positional argument "order_id" in call to "delay" of "Task"


@task(bind=True)  # E: type "Callable[[], int]"; expected "Callable[[Any], int]"  [arg-type]
def forgot_self() -> int:
    return 1
'''

LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): (?P<kind>error|note): (?P<text>.*)$")


def marks(source: str) -> list[tuple[int, str, str]]:
    """(line, "error" or "note", text) of each mark in ``source``."""
    found = []
    for number, line in enumerate(source.splitlines(), start=1):
        for kind, text in re.findall(r"# ([EN]): (.*?)(?=  # [EN]: |$)", line):
            found.append((number, "error" if kind == "E" else "note", text))
    return found


def test_calls_are_checked_against_the_task_signature(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    source = textwrap.dedent(SNIPPET).lstrip()
    snippet = tmp_path / "snippet.py"
    snippet.write_text(source)
    stdout, stderr, status = api.run([
        str(snippet), "--config-file", str(REPO / "pyproject.toml"),
        "--cache-dir", str(tmp_path_factory.mktemp("mypy-cache")),
        # Only the snippet is under test; the package itself is checked by the lint job.
        "--follow-imports", "silent", "--no-error-summary", "--hide-error-context",
    ])
    assert not stderr, stderr
    unmatched = []
    for line in stdout.splitlines():
        parsed = LINE.match(line)
        assert parsed and Path(parsed["path"]).name == "snippet.py", f"unexpected: {line}"
        # Older mypy versions spell builtin types with their module.
        unmatched.append((int(parsed["line"]), parsed["kind"],
                          parsed["text"].replace("builtins.", "")))
    missing = []
    for number, kind, text in marks(source):
        match = next((found for found in unmatched
                      if found[:2] == (number, kind) and text in found[2]), None)
        if match is None:
            missing.append((number, kind, text))
        else:
            unmatched.remove(match)
    assert (missing, unmatched) == ([], []), stdout
    assert status == 1  # errors were found: the ones expected
