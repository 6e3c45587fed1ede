"""The admin for groups and chords (progress, retry as a whole) and the workflow links of stored
results, through Django's test client."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_tasks_q import chain, chord, group, message
from django_tasks_q.admin.groups import STALE_OPTIONS, fresh
from django_tasks_q.canvas import Signature
from django_tasks_q.models import TaskGroup, TaskResult, TaskState

from . import tasks
from .memory import drain

pytestmark = pytest.mark.django_db

LIST_URL = "/admin/django_tasks_q/taskgroup/"
RESULTS_URL = "/admin/django_tasks_q/taskresult/"
QUEUES = ("default", "high", "low")


def login(client: Client, name: str, *codenames: str, superuser: bool = False) -> Client:
    if superuser:
        user = User.objects.create_superuser(name, f"{name}@example.com", "pw")
    else:
        user = User.objects.create_user(name, f"{name}@example.com", "pw", is_staff=True)
        user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client.force_login(user)
    return client


@pytest.fixture
def admin(client: Client) -> Client:
    return login(client, "root", superuser=True)


@pytest.fixture
def viewer(client: Client) -> Client:
    return login(client, "viewer", "view_taskgroup")


@pytest.fixture
def retrier(client: Client) -> Client:
    return login(client, "retrier", "view_taskgroup", "retry_taskgroup")


@pytest.fixture(autouse=True)
def _empty_queues() -> Iterator[None]:
    for queue in QUEUES:
        drain(queue)
    yield


@pytest.fixture
def published(settings: Any) -> None:
    """Publish at once: the test's transaction, which on-commit publishing waits for, never
    commits."""
    settings.TASKS_Q = {**settings.TASKS_Q, "ENQUEUE_ON_COMMIT": False}


def detail_url(row: TaskGroup) -> str:
    return f"{LIST_URL}{row.pk}/change/"


def retry_url(row: TaskGroup) -> str:
    return f"{LIST_URL}{row.pk}/retry/"


def page(client: Client, url: str = LIST_URL, **query: Any) -> str:
    response = client.get(url, query)
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def columns(html: str) -> dict[str, dict[str, str]]:
    """The list's rows by group id, each as {column: text}, top to bottom."""
    rows: dict[str, dict[str, str]] = {}
    for row in re.findall(r"<tr>(.*?)</tr>", html, re.S):
        cells = {name: re.sub(r"<[^>]+>", "", text).strip() for name, text in
                 re.findall(r'<t[hd] class="field-(\w+)"[^>]*>(.*?)</t[hd]>', row, re.S)}
        if "group_id" in cells:
            rows[cells["group_id"]] = cells
    return rows


def message_texts(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def stored(size: int = 3, minutes_ago: float = 0, body: bool = False,
           **fields: Any) -> TaskGroup:
    """A group (or with ``body``, a chord) as sending one stores it, without sending it."""
    ids = [message.new_id() for _ in range(size)]
    body_id = message.new_id() if body else ""
    values = {"group_id": message.new_id(), "size": size, "task_ids": ids,
              "canvas": {"task": "celery.chord" if body else "celery.group"},
              "body_id": body_id,
              "body": {"task": "tests.tasks.total", "options": {"task_id": body_id}}
              if body else None,
              "date_created": timezone.now() - timedelta(minutes=minutes_ago), **fields}
    return TaskGroup.objects.create(**values)


def member(row: TaskGroup, index: int, status: str = TaskState.SUCCESS,
           **fields: Any) -> TaskResult:
    """The stored result of ``row``'s member ``index``."""
    return TaskResult.objects.create(**{
        "task_id": row.task_ids[index], "task_name": "tests.tasks.add", "status": status,
        "group_id": row.group_id, "root_id": row.task_ids[index], "date_done": timezone.now(),
        **fields})


def sent(workflow: Signature) -> TaskGroup:
    """``workflow`` sent (its messages then taken off the queues); its stored row."""
    handle = workflow.apply_async()
    for queue in QUEUES:
        drain(queue)
    header = handle.parent if handle.parent is not None else handle
    return TaskGroup.objects.get(group_id=header.id)


# -- the list ------------------------------------------------------------------------------------

def test_the_list_shows_kind_size_progress_and_body_state(admin: Client) -> None:
    plain = stored(size=3, minutes_ago=1)
    member(plain, 0)
    member(plain, 1, TaskState.FAILURE)
    waiting = stored(size=3, minutes_ago=2, body=True)
    member(waiting, 0)
    member(waiting, 1, TaskState.STARTED)  # not finished yet
    # The body was sent: the members' rows went, their results live on in the row.
    done = stored(size=2, minutes_ago=3, body=True, results=[2, 4], date_done=timezone.now())
    done.fired_by = done.task_ids[1]
    done.save()
    failed = stored(size=3, minutes_ago=4, body=True, date_done=timezone.now())
    failed.fired_by = failed.task_ids[2]
    failed.save()
    member(failed, 0)
    member(failed, 2, TaskState.REVOKED)
    TaskResult.objects.create(task_id=failed.body_id, task_name="tests.tasks.total",
                              status=TaskState.FAILURE, result={"exc_type": "ChordError"})
    TaskResult.objects.create(task_id=message.new_id(), task_name="tests.tasks.add",
                              status=TaskState.SUCCESS)  # in no group: counted nowhere

    html = page(admin)
    for column in ("group_id", "kind", "size", "finished", "body_state", "created", "done"):
        assert re.search(f'<th scope="col" class="[^"]*column-{column}[ "]', html), column
    rows = columns(html)
    assert list(rows) == [plain.group_id, waiting.group_id, done.group_id, failed.group_id]
    shown = {gid: (r["kind"], r["size"], r["finished"], r["body_state"]) for gid, r in rows.items()}
    assert shown == {
        plain.group_id: ("group", "3", "2 of 3, 1 failed", "-"),
        waiting.group_id: ("chord", "3", "1 of 3", "waiting"),
        done.group_id: ("chord", "2", "2 of 2", "sent"),
        failed.group_id: ("chord", "3", "2 of 3, 1 failed", "failed"),
    }
    assert rows[plain.group_id]["done"] == "-" and rows[done.group_id]["done"] != "-"
    # Only "created" is offered for sorting (its index); the oldest first on asking.
    assert 'class="sortable column-created' in html and "sortable column-size" not in html
    assert list(columns(page(admin, o="6"))) == [failed.group_id, done.group_id,
                                                 waiting.group_id, plain.group_id]


def test_filter_by_kind_and_search_by_group_id(admin: Client) -> None:
    plain = stored(minutes_ago=1)
    joined = stored(minutes_ago=2, body=True)
    assert list(columns(page(admin, kind="group"))) == [plain.group_id]
    assert list(columns(page(admin, kind="chord"))) == [joined.group_id]
    assert list(columns(page(admin, q=f" {joined.group_id} "))) == [joined.group_id]
    assert list(columns(page(admin, q=joined.group_id[:8]))) == []  # whole ids only
    assert "A group id (exact)." in page(admin)


def test_rows_are_read_only(admin: Client) -> None:
    row = stored()
    html = page(admin, detail_url(row))
    assert 'name="_save"' not in html and 'name="_continue"' not in html
    assert admin.post(detail_url(row), {"size": "9"}).status_code == 403
    row.refresh_from_db()
    assert row.size == 3
    assert admin.get(f"{LIST_URL}add/").status_code == 403
    assert f'href="{LIST_URL}add/"' not in page(admin)


# -- fast on a big table ----------------------------------------------------------------------

def _list_queries(client: Client, **query: Any) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        page(client, **query)
    return [q["sql"] for q in queries]


def _groups(count: int, minutes_ago: float = 0) -> list[TaskGroup]:
    """``count`` chords with a finished member each, every other one failed by its body; the
    first sent ``minutes_ago``, the others a second apart before it."""
    now = timezone.now() - timedelta(minutes=minutes_ago)
    rows = TaskGroup.objects.bulk_create(
        TaskGroup(group_id=message.new_id(), size=2, task_ids=[message.new_id(), message.new_id()],
                  canvas={}, body_id=message.new_id(), fired_by="x" if i % 2 else "",
                  date_created=now - timedelta(seconds=i)) for i in range(count))
    TaskResult.objects.bulk_create(
        [TaskResult(task_id=row.task_ids[0], task_name="tests.tasks.add", group_id=row.group_id,
                    status=TaskState.FAILURE, date_done=now) for row in rows]
        + [TaskResult(task_id=row.body_id, task_name="tests.tasks.total",
                      status=TaskState.FAILURE, date_done=now) for row in rows if row.fired_by])
    return rows


def test_the_list_page_queries_do_not_grow_with_the_groups(admin: Client) -> None:
    _groups(3)
    small = _list_queries(admin)
    on_page = _groups(47)
    big = _list_queries(admin)
    assert len(big) == len(small), "\n".join(big)
    rows = columns(page(admin))
    assert len(rows) == 50
    assert {(r["finished"], r["body_state"]) for r in rows.values()} == {
        ("1 of 2, 1 failed", "waiting"), ("1 of 2, 1 failed", "failed")}
    # The members are counted in one query for the page, over the page's group ids.
    [counting] = [sql for sql in big if "GROUP BY" in sql.upper()]
    assert "django_tasks_q_taskresult" in counting
    assert all(row.group_id in counting for row in on_page)
    for sql in big:
        for counted in re.findall(r"COUNT\((.*)", sql, re.I):
            if sql is not counting:  # the paginator's: over a LIMITed subquery
                assert re.search(r"FROM \(SELECT .* LIMIT \d+\) subquery", counted), sql
    # The page's rows leave out the canvases and results the list does not show.
    [listing] = [sql for sql in big if 'FROM "django_tasks_q_taskgroup"' in sql
                 and "COUNT(" not in sql]
    assert '"group_id"' in listing and '"canvas"' not in listing and '"results"' not in listing
    # Past one page: the same queries, and the members of that page's groups only are counted.
    older = _groups(70, minutes_ago=60)
    paged = _list_queries(admin)
    assert len(paged) == len(small), "\n".join(paged)
    [counting] = [sql for sql in paged if "GROUP BY" in sql.upper()]
    assert older[0].group_id in counting and older[-1].group_id not in counting


# -- the detail page -----------------------------------------------------------------------------

def test_the_detail_page_of_a_chord(admin: Client) -> None:
    row = sent(chord([tasks.add.s(i, 1) for i in range(3)], tasks.total.s()))
    member(row, 0)
    html = page(admin, detail_url(row))
    for label, value in (("group_id", row.group_id), ("kind", "chord"), ("size", "3"),
                         ("finished", "1 of 3"), ("body_state", "waiting")):
        assert re.search(rf'field-{label}">.*?<div class="readonly">{re.escape(value)}</div>',
                         html, re.S), label
    for task_id in row.task_ids:
        assert f"&quot;{task_id}&quot;" in html
    members = f"{RESULTS_URL}?group_id={row.group_id}"
    assert f'href="{members}"' in html
    assert f'href="{RESULTS_URL}?q={row.body_id}"' in html
    assert "&quot;task&quot;: &quot;tests.tasks.total&quot;" in html  # the body
    assert "&quot;task&quot;: &quot;celery.chord&quot;" in html  # the canvas
    assert 'id="dtq-retry"' in html and f'action="{retry_url(row)}"' in html
    # The members' link lists the members only.
    other = TaskResult.objects.create(task_id=message.new_id(), task_name="tests.tasks.add")
    listing = page(admin, members)
    assert row.task_ids[0] in listing and other.task_id not in listing


def test_the_detail_page_of_a_group_has_no_body(admin: Client) -> None:
    row = stored()
    html = page(admin, detail_url(row))
    assert "Chord body" not in html and "field-body_json" not in html
    assert "field-body_state" not in html and 'id="dtq-retry"' in html
    assert re.search(r'field-finished">.*?<div class="readonly">0 of 3</div>', html, re.S)


# -- retry ---------------------------------------------------------------------------------------

def test_retrying_a_group_sends_its_tasks_again_with_new_ids(admin: Client,
                                                             published: None) -> None:
    row = sent(group(tasks.add.s(1, 2), tasks.add.s(3, 4), tasks.multiply.s(5, y=6)))
    response = admin.post(LIST_URL, {"action": "retry", "_selected_action": [row.pk],
                                     "index": 0}, follow=True)
    again = drain("default")
    assert [(h["task"], body[:2]) for h, body, _ in again] == [
        ("tests.tasks.add", [[1, 2], {}]), ("tests.tasks.add", [[3, 4], {}]),
        ("tests.tasks.multiply", [[5], {"y": 6}])]
    new_ids = [h["id"] for h, _, _ in again]
    assert not set(new_ids) & set(row.task_ids)
    [new_group] = {h["group"] for h, _, _ in again}
    assert new_group != row.group_id
    assert [h["group_index"] for h, _, _ in again] == [0, 1, 2]
    # A workflow of its own: not a branch of the first sending's.
    assert all(h["root_id"] == h["id"] and h["parent_id"] is None for h, _, _ in again)
    new = TaskGroup.objects.get(group_id=new_group)
    assert (new.size, new.task_ids, new.body_id) == (3, new_ids, "")
    [text] = message_texts(response)
    assert text == (f'Sent the group {row.group_id} again: the new group id is '
                    f'<a href="{detail_url(new)}">{new_group}</a>.')
    assert f'<a href="{detail_url(new)}">{new_group}</a>' in response.content.decode()
    assert TaskGroup.objects.get(pk=row.pk).task_ids == row.task_ids  # the old row stays


def test_retrying_a_chord_sends_its_header_and_body_again(admin: Client,
                                                          published: None) -> None:
    row = sent(chord([tasks.add.s(i, 1) for i in range(3)],
                     tasks.total.s().on_error(tasks.note_failure.s())))
    response = admin.post(LIST_URL, {"action": "retry", "_selected_action": [row.pk],
                                     "index": 0}, follow=True)
    again = drain("default")
    assert [(h["task"], body[0]) for h, body, _ in again] == [
        ("tests.tasks.add", [0, 1]), ("tests.tasks.add", [1, 1]), ("tests.tasks.add", [2, 1])]
    bodies = [body[2]["chord"] for _, body, _ in again]
    assert all(b == bodies[0] for b in bodies)
    body = bodies[0]
    assert body["task"] == "tests.tasks.total" and body["chord_size"] == 3
    assert body["options"]["task_id"] not in ("", None, row.body_id)
    [errback] = body["options"]["link_error"]  # the body's errback goes along
    assert errback["task"] == "tests.tasks.note_failure" and "task_id" not in errback["options"]
    [new_group] = {h["group"] for h, _, _ in again}
    new = TaskGroup.objects.get(group_id=new_group)
    assert new_group != row.group_id and new.body_id == body["options"]["task_id"]
    assert (new.size, new.fired_by, new.results) == (3, "", None)
    assert not set(new.task_ids) & set(row.task_ids)
    assert message_texts(response) == [
        f'Sent the chord {row.group_id} again: the new group id is '
        f'<a href="{detail_url(new)}">{new_group}</a>.']


def test_retrying_a_group_of_chains_gives_every_step_a_new_id(admin: Client,
                                                              published: None) -> None:
    row = sent(group(chain(tasks.add.s(1, 1), tasks.add.s(2)), tasks.add.s(3, 3)))
    [first_before] = [t for t in row.canvas["kwargs"]["tasks"] if t["subtask_type"] == "chain"]
    old_next = first_before["kwargs"]["tasks"][1]["options"]["task_id"]
    admin.post(LIST_URL, {"action": "retry", "_selected_action": [row.pk], "index": 0})
    (head, head_body, _), (other, _, _) = drain("default")
    assert head_body[:2] == [[1, 1], {}] and other["task"] == "tests.tasks.add"
    [step] = head_body[2]["chain"]
    assert step["args"] == [2] and step["options"]["task_id"] not in (None, old_next)


def test_the_detail_page_retry_button(admin: Client, published: None) -> None:
    row = sent(group(tasks.add.s(1, 2), tasks.add.s(3, 4)))
    assert admin.get(retry_url(row)).status_code == 405
    assert drain("default") == []
    response = admin.post(retry_url(row), follow=True)
    assert response.redirect_chain[-1][0] == detail_url(row)
    again = drain("default")
    assert len(again) == 2 and again[0][0]["group"] in message_texts(response)[0]
    assert admin.post(f"{LIST_URL}999999/retry/").status_code == 404


def test_the_retry_button_checks_the_csrf_token(admin: Client) -> None:
    row = stored()
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(User.objects.get(username="root"))
    assert strict.post(retry_url(row)).status_code == 403
    assert TaskGroup.objects.count() == 1


def test_a_row_that_cannot_be_sent_says_why(admin: Client, published: None) -> None:
    odd = stored(canvas={"task": "tests.tasks.add", "args": [1, 2], "kwargs": {},
                         "options": {}, "subtask_type": None})
    fine = sent(group(tasks.add.s(5, 5)))
    response = admin.post(LIST_URL, {"action": "retry", "index": 0,
                                     "_selected_action": [odd.pk, fine.pk]}, follow=True)
    texts = message_texts(response)
    assert f"Could not send the group {odd.group_id} again: its stored canvas is a task, " \
           "not a group or chord" in texts
    [(headers, body, _)] = drain("default")
    assert body[:2] == [[5, 5], {}] and any(headers["group"] in t for t in texts)


def test_a_group_sent_to_a_queue_is_sent_there_again(admin: Client, published: None) -> None:
    row = sent(group([tasks.add.s(1, 2), tasks.add.s(3, 4)], queue="high"))
    admin.post(retry_url(row))
    assert len(drain("high")) == 2 and drain("default") == []


# -- fresh(): the canvas to send again -------------------------------------------------------

def _options(sig: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The options of ``sig`` and of every signature it holds."""
    yield sig["options"]
    for key in ("link", "link_error"):
        for linked in sig["options"].get(key) or []:
            yield from _options(linked)
    kwargs = sig["kwargs"]
    for nested in [*(kwargs.get("tasks") or []), kwargs.get("header"), kwargs.get("body")]:
        if isinstance(nested, dict):
            yield from _options(nested)


def test_fresh_drops_every_id_and_placement_and_keeps_the_calls() -> None:
    data = {"task": "x", "options": {"task_id": "keep me"}}  # an argument, not a signature
    whole = chord(group(chain(tasks.add.s(1, 1), tasks.add.s(2).set(queue="high", priority=5)),
                        Signature("tests.tasks.total", args=[[data]])),
                  tasks.total.s().on_error(tasks.note_failure.s()))
    whole.freeze()
    whole.body.options.update(chain=[dict(tasks.add.s(9, 9))], root_id="r", parent_id="p",
                              eta="2030-01-01T00:00:00+00:00", expires=60, countdown=5)
    stored_form = dict(whole)
    before = repr(stored_form)
    again = fresh(stored_form)
    assert repr(stored_form) == before  # the stored canvas is left as it was
    placed = [opts for opts in _options(again) if set(opts) & set(STALE_OPTIONS)]
    assert placed == []
    assert [o for o in _options(dict(whole)) if "task_id" in o]  # there were some to drop
    header, body = again["kwargs"]["header"], again["kwargs"]["body"]
    steps, total = header["kwargs"]["tasks"]
    assert [s["args"] for s in steps["kwargs"]["tasks"]] == [[1, 1], [2]]
    assert steps["kwargs"]["tasks"][1]["options"] == {"queue": "high", "priority": 5}
    assert total["args"] == [[data]]  # a task's own arguments are never touched
    assert body["task"] == "tests.tasks.total" and body["chord_size"] is None
    assert body["options"]["link_error"][0]["task"] == "tests.tasks.note_failure"


# -- permissions ---------------------------------------------------------------------------------

def test_a_view_only_user_can_look_but_not_act(viewer: Client, published: None) -> None:
    row = sent(group(tasks.add.s(1, 2)))
    html = page(viewer)
    assert row.group_id in html
    assert 'value="retry"' not in html and 'value="delete_selected"' not in html
    detail = page(viewer, detail_url(row))
    assert row.task_ids[0] in detail
    assert 'id="dtq-retry"' not in detail and "deletelink" not in detail
    for action in ("retry", "delete_selected"):
        forged = viewer.post(LIST_URL, {"action": action, "_selected_action": [row.pk],
                                        "index": 0, "post": "yes"})
        assert forged.status_code == 403, action
    assert viewer.post(retry_url(row)).status_code == 403
    assert viewer.post(f"{LIST_URL}{row.pk}/delete/", {"post": "yes"}).status_code == 403
    assert drain("default") == [] and TaskGroup.objects.count() == 1


def test_the_retry_permission_allows_retry_but_not_delete(retrier: Client,
                                                          published: None) -> None:
    row = sent(group(tasks.add.s(1, 2)))
    html = page(retrier)
    assert 'value="retry"' in html and 'value="delete_selected"' not in html
    assert 'id="dtq-retry"' in page(retrier, detail_url(row))
    retrier.post(retry_url(row))
    assert len(drain("default")) == 1
    response = retrier.post(LIST_URL, {"action": "retry", "_selected_action": [row.pk],
                                       "index": 0})
    assert response.status_code == 302 and len(drain("default")) == 1
    assert retrier.post(LIST_URL, {"action": "delete_selected", "_selected_action": [row.pk],
                                   "index": 0, "post": "yes"}).status_code == 403
    assert TaskGroup.objects.filter(pk=row.pk).exists()


def test_a_superuser_can_delete(admin: Client) -> None:
    rows = [stored(), stored(body=True)]
    admin.post(LIST_URL, {"action": "delete_selected", "index": 0, "post": "yes",
                          "_selected_action": [r.pk for r in rows]})
    assert not TaskGroup.objects.exists()


# -- stored results: their place in a workflow ----------------------------------------------

def test_a_result_shows_its_workflow_and_links_to_the_rest_of_it(admin: Client) -> None:
    root, group_id = message.new_id(), message.new_id()
    first = TaskResult.objects.create(task_id=root, task_name="tests.tasks.add", root_id=root,
                                      status=TaskState.SUCCESS, date_done=timezone.now())
    row = TaskResult.objects.create(task_id=message.new_id(), task_name="tests.tasks.boom",
                                    status=TaskState.FAILURE, root_id=root, parent_id=root,
                                    group_id=group_id, date_done=timezone.now())
    sibling = TaskResult.objects.create(task_id=message.new_id(), task_name="tests.tasks.add",
                                        group_id=group_id, root_id=message.new_id())
    stranger = TaskResult.objects.create(task_id=message.new_id(), task_name="tests.tasks.add",
                                         root_id=message.new_id())
    html = page(admin, f"{RESULTS_URL}{row.pk}/change/")
    workflow = f"{RESULTS_URL}?root_id={root}"
    members = f"{RESULTS_URL}?group_id={group_id}"
    assert f'href="{workflow}">all tasks of this workflow</a>' in html
    assert f'href="{RESULTS_URL}?q={root}">{root}</a>' in html  # the parent
    assert f'href="{LIST_URL}?q={group_id}">{group_id}</a>' in html
    assert f'href="{members}">all members of this group</a>' in html

    def ids(url: str) -> set[str]:
        found = page(admin, url)
        return {t for t in (first.task_id, row.task_id, sibling.task_id, stranger.task_id)
                if t in found}

    assert ids(workflow) == {first.task_id, row.task_id}
    assert ids(members) == {row.task_id, sibling.task_id}
    assert ids(f"{RESULTS_URL}?q={root}") == {first.task_id}
    # The filter shows while it applies (so that it can be cleared), not otherwise.
    assert 'data-filter-title="workflow"' in page(admin, workflow)
    assert 'data-filter-title="workflow"' not in page(admin, RESULTS_URL)
    plain = page(admin, f"{RESULTS_URL}{stranger.pk}/change/")
    assert re.search(r'field-group_link">.*?<div class="readonly">-</div>', plain, re.S)


def test_the_workflow_filters_add_no_query(admin: Client) -> None:
    root = message.new_id()
    TaskResult.objects.bulk_create(
        TaskResult(task_id=message.new_id(), task_name="tests.tasks.add", root_id=root,
                   group_id=root, date_done=timezone.now()) for _ in range(5))
    with CaptureQueriesContext(connection) as plain:
        page(admin, RESULTS_URL)
    with CaptureQueriesContext(connection) as filtered:
        page(admin, RESULTS_URL, root_id=root, group_id=root)
    assert len(filtered) == len(plain)
