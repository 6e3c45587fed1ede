"""The admin for stored task outcomes (failure triage and retry), through Django's test client."""

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

from django_tasks_q import message
from django_tasks_q.admin.paging import BoundedPaginator
from django_tasks_q.admin.results import readable
from django_tasks_q.models import TaskResult, TaskState

from . import tasks  # noqa: F401 - registers the tasks the rows name
from .memory import drain

pytestmark = pytest.mark.django_db

LIST_URL = "/admin/django_tasks_q/taskresult/"
TRACEBACK = ('Traceback (most recent call last):\n  File "tests/tasks.py", line 24, in boom\n'
             '    raise ValueError(message)\nValueError: card declined for order 7\n')


def detail_url(row: TaskResult) -> str:
    return f"{LIST_URL}{row.pk}/change/"


def retry_url(row: TaskResult) -> str:
    return f"{LIST_URL}{row.pk}/retry/"


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
    return login(client, "viewer", "view_taskresult")


@pytest.fixture
def retrier(client: Client) -> Client:
    return login(client, "retrier", "view_taskresult", "retry_taskresult")


@pytest.fixture(autouse=True)
def _empty_queues() -> Iterator[None]:
    for queue in ("default", "high", "low"):
        drain(queue)
    yield


@pytest.fixture
def published(settings: Any) -> None:
    """Publish at once: the test's transaction, which on-commit publishing waits for, never
    commits."""
    settings.TASKS_Q = {**settings.TASKS_Q, "ENQUEUE_ON_COMMIT": False}


def failure(minutes_ago: float = 0, **fields: Any) -> TaskResult:
    """A stored failure of ``tests.tasks.boom`` that finished ``minutes_ago``."""
    done = timezone.now() - timedelta(minutes=minutes_ago)
    values = {"task_id": message.new_id(), "task_name": "tests.tasks.boom",
              "status": TaskState.FAILURE, "args": ["card declined for order 7"],
              "kwargs": {}, "traceback": TRACEBACK, "worker": "w1@host", "queue": "default",
              "result": {"exc_type": "ValueError", "exc_qualname": "ValueError",
                         "exc_module": "builtins", "exc_message": "card declined for order 7"},
              "date_started": done - timedelta(seconds=2.5), "date_done": done,
              "date_created": done, **fields}
    return TaskResult.objects.create(**values)


def page(client: Client, url: str = LIST_URL, **query: Any) -> str:
    response = client.get(url, query)
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def listed(html: str) -> list[str]:
    """The task ids in the list's rows, top to bottom."""
    return re.findall(r'<th class="field-task_id"><a href="[^"]+">([^<]+)</a>', html)


def message_texts(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


# -- the list ------------------------------------------------------------------------------------

def test_the_list_shows_its_columns_newest_first(admin: Client) -> None:
    old = failure(minutes_ago=30)
    new = failure(minutes_ago=1, task_name="tests.tasks.multiply", queue="high", worker="w2@h")
    middle = failure(minutes_ago=10, date_started=None)
    html = page(admin)
    for column in ("task_id", "task", "status", "queue", "worker", "runtime", "finished"):
        assert re.search(f'<th scope="col" class="[^"]*column-{column}[ "]', html), column
    assert listed(html) == [new.task_id, middle.task_id, old.task_id]
    assert '<td class="field-runtime">2.5 s</td>' in html
    assert '<td class="field-runtime">-</td>' in html  # never started: no runtime
    assert '<td class="field-queue">high</td>' in html and "w2@h" in html
    # Only "finished" is offered for sorting: any other order would sort the table per page.
    assert 'class="sortable column-finished' in html
    assert 'class="sortable column-worker' not in html
    assert listed(page(admin, o="7")) == [old.task_id, middle.task_id, new.task_id]
    assert listed(page(admin, o="5")) == [new.task_id, middle.task_id, old.task_id]


def test_readable_runtimes() -> None:
    assert [readable(timedelta(seconds=s)) for s in (0.25, 3.44, 125, 3840, 90000)] == [
        "250 ms", "3.4 s", "2 min 5 s", "1 h 4 min", "1 d 1 h"]
    assert readable(None) == "-" and readable(timedelta(seconds=-1)) == "-"


def test_filters_by_status_task_queue_and_date(admin: Client) -> None:
    boom = failure(minutes_ago=5)
    revoked = failure(minutes_ago=6, status=TaskState.REVOKED, queue="low")
    multiply = failure(minutes_ago=7, task_name="tests.tasks.multiply", status=TaskState.SUCCESS)
    elsewhere = failure(minutes_ago=8, task_name="billing.tasks.invoice", queue="billing")
    last_month = failure(minutes_ago=60 * 24 * 40)
    html = page(admin)
    # The choices: registered tasks and TASKS_Q QUEUES, plus names seen in the newest rows.
    for choice in ("?task_name=tests.tasks.quiet", "?task_name=billing.tasks.invoice",
                   "?queue=high", "?queue=billing", "?status__exact=REVOKED", "date_done__gte="):
        assert choice in html, choice
    assert set(listed(page(admin, status__exact="REVOKED"))) == {revoked.task_id}
    assert set(listed(page(admin, task_name="tests.tasks.multiply"))) == {multiply.task_id}
    assert set(listed(page(admin, queue="billing"))) == {elsewhere.task_id}
    past_week = re.search(r'href="(\?date_done__gte=[^"]+)"[^>]*>Past 7 days', html)
    assert past_week is not None
    recent = listed(page(admin, LIST_URL + past_week[1].replace("&amp;", "&")))
    assert set(recent) == {boom.task_id, revoked.task_id, multiply.task_id, elsewhere.task_id}
    assert last_month.task_id in listed(html)
    # A task no row or registry names any more is still offered while it is selected.
    assert "?task_name=gone.task" in page(admin, task_name="gone.task")


def test_the_filters_read_no_distinct_values_from_the_table(admin: Client) -> None:
    failure()
    with CaptureQueriesContext(connection) as queries:
        page(admin)
    assert not [q["sql"] for q in queries if "DISTINCT" in q["sql"].upper()]


def test_search_by_id_name_and_exception_text(admin: Client) -> None:
    boom = failure(minutes_ago=1)
    other = failure(minutes_ago=2, task_name="tests.tasks.multiply", traceback="",
                     result={"exc_type": "ZeroDivisionError", "exc_message": "division by zero"})
    custom = failure(minutes_ago=3, task_id="fixed-id", task_name="tests.tasks.quiet",
                     traceback="", result=None)
    with CaptureQueriesContext(connection) as queries:
        assert listed(page(admin, q=f"  {boom.task_id} ")) == [boom.task_id]
    by_id = [q["sql"] for q in queries if "django_tasks_q_taskresult" in q["sql"]
             and boom.task_id in q["sql"]]
    assert by_id and not [sql for sql in by_id if "LIKE" in sql.upper()]  # the unique index
    assert listed(page(admin, q=boom.task_id[:8])) == []  # ids match whole, not in part
    assert listed(page(admin, q="fixed-id")) == [custom.task_id]
    assert listed(page(admin, q="MULTIPLY")) == [other.task_id]
    assert listed(page(admin, q="card declined")) == [boom.task_id]  # in the traceback
    assert listed(page(admin, q="division by")) == [other.task_id]  # in the stored message
    assert listed(page(admin, q="ZeroDivision")) == [other.task_id]
    assert "the exception text is searched row by row" in page(admin)


# -- fast on a big table -----------------------------------------------------------------------

def _list_queries(client: Client, url: str = LIST_URL, **query: Any) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        page(client, url, **query)
    return [q["sql"] for q in queries]


def _rows(count: int) -> None:
    now = timezone.now()
    TaskResult.objects.bulk_create(
        TaskResult(task_id=message.new_id(), task_name="tests.tasks.boom",
                   status=TaskState.FAILURE, queue="default", traceback=TRACEBACK,
                   date_done=now - timedelta(seconds=i)) for i in range(count))


def test_the_list_page_queries_do_not_grow_with_the_table(admin: Client) -> None:
    _rows(3)
    small = _list_queries(admin)
    _rows(400)
    big = _list_queries(admin)
    assert len(big) == len(small), "\n".join(big)
    filtered = _list_queries(admin, status__exact="FAILURE", queue="default", p="2")
    assert len(filtered) == len(small), "\n".join(filtered)
    for sql in big + filtered:
        for counted in re.findall(r"COUNT\((.*)", sql, re.I):
            # Every count is over a LIMITed subquery, never the whole table.
            assert re.search(r"FROM \(SELECT .* LIMIT \d+\) subquery", counted), sql
    assert any("COUNT(" in sql for sql in big)
    # The page's rows leave out what the list does not show.
    [rows] = [sql for sql in big if re.search(r"LIMIT 100\b", sql) and "COUNT(" not in sql]
    assert '"task_id"' in rows and '"traceback"' not in rows and '"args"' not in rows


def test_a_count_past_its_limit_says_so(admin: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BoundedPaginator, "limit", 150)
    _rows(320)
    html = page(admin)
    assert "150+ task results: the first 150 can be paged through" in html
    assert 'class="question' not in html  # no "select all N" for an uncounted N
    assert len(listed(html)) == 100
    assert len(listed(page(admin, p="2"))) == 50  # the second, last page
    assert "150+ results" in page(admin, q="tests.tasks.boom")
    nothing = page(admin, q="no such task")
    assert "0 results" in nothing and "0+ results" not in nothing
    monkeypatch.setattr(BoundedPaginator, "limit", 1000)
    assert "320 task results" in page(admin) and "Select all 320 task results" in page(admin)


# -- the detail page -----------------------------------------------------------------------------

def test_the_detail_page_shows_the_exception_traceback_arguments_and_timings(
        admin: Client) -> None:
    row = failure(args=[7, "ünïcode"], kwargs={"to": ["a@example.com"], "notify": True},
                  retries=3, priority=6, worker="w9@host", queue="low",
                  result={"exc_type": "PaymentDeclined", "exc_qualname": "PaymentDeclined",
                          "exc_module": "shop.tasks", "exc_message": "card <declined>"})
    html = page(admin, detail_url(row))
    assert ('<strong title="shop.tasks.PaymentDeclined">PaymentDeclined</strong>: '
            "card &lt;declined&gt;") in html
    assert '<pre class="dtq-pre dtq-traceback">Traceback (most recent call last):\n' in html
    assert "    raise ValueError(message)\n" in html  # whitespace kept as it was
    assert '<pre class="dtq-pre">[\n  7,\n  &quot;ünïcode&quot;\n]</pre>' in html
    assert ('<pre class="dtq-pre">{\n  &quot;to&quot;: [\n    &quot;a@example.com&quot;\n  ],\n'
            "  &quot;notify&quot;: true\n}</pre>") in html
    for label, value in (("retries", "3"), ("priority", "6"), ("worker", "w9@host"),
                         ("queue", "low"), ("runtime", "2.5 s")):
        assert re.search(rf'field-{label}">.*?<div class="readonly">{re.escape(value)}</div>',
                         html, re.S), label
    for timing in ("date_created", "date_started", "date_done"):
        assert f"field-{timing}" in html
    assert "white-space: pre" in html and "overflow: auto" in html


def test_a_success_shows_its_result_instead(admin: Client) -> None:
    row = failure(status=TaskState.SUCCESS, traceback="", result={"total": 42})
    html = page(admin, detail_url(row))
    assert "field-result_json" in html and "&quot;total&quot;: 42" in html
    assert "dtq-traceback" not in html


def test_rows_are_read_only(admin: Client) -> None:
    row = failure()
    html = page(admin, detail_url(row))
    assert 'name="_save"' not in html and 'name="_continue"' not in html
    response = admin.post(detail_url(row), {"task_name": "changed", "status": "SUCCESS"})
    assert response.status_code == 403
    row.refresh_from_db()
    assert (row.task_name, row.status) == ("tests.tasks.boom", TaskState.FAILURE)
    assert admin.get(f"{LIST_URL}add/").status_code == 403
    assert f'href="{LIST_URL}add/"' not in page(admin)


# -- retry ---------------------------------------------------------------------------------------

def test_retry_sends_the_same_task_with_its_arguments_queue_and_priority(
        admin: Client, published: None) -> None:
    row = failure(task_name="tests.tasks.multiply", args=[6], kwargs={"y": 7}, queue="low",
                  priority=8)
    response = admin.post(LIST_URL, {"action": "retry", "_selected_action": [row.pk],
                                     "index": 0}, follow=True)
    [(headers, body, priority)] = drain("low")
    assert headers["task"] == "tests.tasks.multiply" and headers["id"] != row.task_id
    assert (body[:2], priority) == ([[6], {"y": 7}], 8)
    assert headers["eta"] is None and headers["expires"] is None and drain("default") == []
    assert message_texts(response) == [
        f"Sent tests.tasks.multiply[{row.task_id}] again: the new task id is {headers['id']}."]
    assert TaskResult.objects.count() == 1  # the old row stays as it was


def test_retrying_many_rows_lists_the_new_ids(admin: Client, published: None) -> None:
    rows = [failure(minutes_ago=i, args=[f"order {i}"]) for i in range(3)]
    response = admin.post(LIST_URL, {"action": "retry", "index": 0,
                                     "_selected_action": [r.pk for r in rows]}, follow=True)
    sent = drain("default")
    assert sorted(body[0] for _, body, _ in sent) == [["order 0"], ["order 1"], ["order 2"]]
    ids = [headers["id"] for headers, _, _ in sent]
    [text] = message_texts(response)
    assert text.startswith("Sent 3 tasks again; their new task ids: ")
    assert all(new in text for new in ids)


def test_a_task_this_process_does_not_know_is_sent_by_name(admin: Client,
                                                          published: None) -> None:
    row = failure(task_name="billing.tasks.invoice", args=[1], kwargs={"a": "b"}, queue="high")
    admin.post(LIST_URL, {"action": "retry", "_selected_action": [row.pk], "index": 0})
    [(headers, body, _)] = drain("high")
    assert headers["task"] == "billing.tasks.invoice" and body[:2] == [[1], {"a": "b"}]


def test_a_row_that_cannot_be_sent_says_why(admin: Client, published: None) -> None:
    gone = failure(queue="retired")
    changed = failure(task_name="tests.tasks.multiply", args=[1, 2, 3])
    ok = failure()
    response = admin.post(LIST_URL, {"action": "retry", "index": 0,
                                     "_selected_action": [gone.pk, changed.pk, ok.pk]},
                          follow=True)
    texts = message_texts(response)
    assert any(f"[{gone.task_id}] again: " in t and "'retired'" in t for t in texts), texts
    assert any(f"[{changed.task_id}] again: " in t and "multiply(x, y)" in t for t in texts)
    assert [h["id"] for h, _, _ in drain("default")] == [texts[-1].rsplit(" ", 1)[-1][:-1]]


def test_the_detail_page_retry_button(admin: Client, published: None) -> None:
    row = failure(args=["again"])
    html = page(admin, detail_url(row))
    assert f'action="{retry_url(row)}"' in html and 'name="csrfmiddlewaretoken"' in html
    assert admin.get(retry_url(row)).status_code == 405
    response = admin.post(retry_url(row), follow=True)
    assert response.redirect_chain[-1][0] == detail_url(row)
    [(headers, body, _)] = drain("default")
    assert body[0] == ["again"] and headers["id"] in message_texts(response)[0]
    assert admin.post(f"{LIST_URL}999999/retry/").status_code == 404


def test_the_retry_button_checks_the_csrf_token(admin: Client) -> None:
    row = failure()
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(User.objects.get(username="root"))
    assert strict.post(retry_url(row)).status_code == 403
    assert drain("default") == []


# -- permissions ---------------------------------------------------------------------------------

def test_a_view_only_user_can_look_but_not_act(viewer: Client, published: None) -> None:
    row = failure()
    html = page(viewer)
    assert row.task_id in html
    assert 'value="retry"' not in html and 'value="delete_selected"' not in html
    detail = page(viewer, detail_url(row))
    assert "Traceback (most recent call last)" in detail
    assert 'id="dtq-retry"' not in detail and "deletelink" not in detail
    for action in ("retry", "delete_selected"):
        forged = viewer.post(LIST_URL, {"action": action, "_selected_action": [row.pk],
                                        "index": 0, "post": "yes"})
        assert forged.status_code == 403, action
    assert viewer.post(retry_url(row)).status_code == 403
    assert viewer.post(f"{LIST_URL}{row.pk}/delete/", {"post": "yes"}).status_code == 403
    assert drain("default") == [] and TaskResult.objects.filter(pk=row.pk).exists()


def test_the_retry_permission_allows_retry_but_not_delete(retrier: Client,
                                                          published: None) -> None:
    row = failure()
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


def test_a_superuser_can_delete(admin: Client) -> None:
    rows = [failure(), failure()]
    admin.post(LIST_URL, {"action": "delete_selected", "index": 0, "post": "yes",
                          "_selected_action": [r.pk for r in rows]})
    assert not TaskResult.objects.exists()



# -- PostgreSQL: the plans ---------------------------------------------------------------------

@pytest.mark.broker
@pytest.mark.postgres  # runs in the integration pass on PostgreSQL
def test_on_postgresql_the_list_and_each_filter_use_an_index(admin: Client) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs DATABASE_URL on PostgreSQL")
    with connection.cursor() as cursor:
        cursor.execute("""
            INSERT INTO django_tasks_q_taskresult (task_id, task_name, status, args, kwargs,
                traceback, worker, queue, retries, date_created, date_done)
            SELECT gen_random_uuid()::text, 'shop.tasks.t' || (i % 40),
                   CASE WHEN i % 97 = 0 THEN 'REVOKED' WHEN i % 7 = 0 THEN 'FAILURE'
                        ELSE 'SUCCESS' END, '[]', '{}', '', 'w@h',
                   (ARRAY['default', 'high', 'low', 'billing'])[1 + i % 4], 0,
                   now() - i * interval '1 second', now() - i * interval '1 second'
            FROM generate_series(1, 200000) AS i""")
        cursor.execute("ANALYZE django_tasks_q_taskresult")
    week = page(admin)
    past_week = re.search(r'href="\?(date_done__gte=[^"]+)"[^>]*>Past 7 days', week)
    assert past_week is not None
    for query in ("", "status__exact=REVOKED", "status__exact=FAILURE",
                  "task_name=shop.tasks.t7", "queue=billing", past_week[1].replace("&amp;", "&"),
                  "p=20", "o=7", f"q={TaskResult.objects.values_list('task_id', flat=True)[0]}"):
        for sql in _list_queries(admin, f"{LIST_URL}?{query}"):
            if "django_tasks_q_taskresult" not in sql:
                continue
            with connection.cursor() as cursor:
                cursor.execute(f"EXPLAIN {sql}")
                plan = "\n".join(row[0] for row in cursor.fetchall())
            assert "Seq Scan" not in plan and "Index" in plan, f"?{query}\n{sql}\n{plan}"
