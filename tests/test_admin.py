"""The admin for periodic tasks, through Django's test client."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from django_tasks_q.models import PeriodicRun, PeriodicTask, TaskResult, TaskState

from . import tasks  # noqa: F401 - registers the tasks offered by the form

pytestmark = pytest.mark.django_db

ADD_URL = "/admin/django_tasks_q/periodictask/add/"
LIST_URL = "/admin/django_tasks_q/periodictask/"
PREVIEW_URL = "/admin/django_tasks_q/periodictask/preview/"


@pytest.fixture
def admin(client: Client) -> Client:
    user = User.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(user)
    return client


@pytest.fixture
def viewer(client: Client) -> Client:
    user = User.objects.create_user("viewer", "viewer@example.com", "pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_periodictask"))
    client.force_login(user)
    return client


def form(**fields: Any) -> dict[str, Any]:
    data = {"name": "nightly", "description": "", "task": "tests.tasks.multiply",
            "kind": "crontab", "crontab": "30 2 * * *", "interval": "", "run_at_0": "",
            "run_at_1": "", "timezone": "Europe/Berlin", "args": "[6, 7]", "kwargs": "{}",
            "queue": "", "priority": "", "expires": "", "catch_up": "once", "enabled": "on"}
    data.update(fields)
    return data


def errors(response: Any) -> dict[str, list[str]]:
    return {field: list(errs) for field, errs in response.context["adminform"].form.errors.items()}


def test_the_add_form_offers_the_registered_tasks_and_a_preview(admin: Client) -> None:
    page = admin.get(ADD_URL).content.decode()
    assert '<option value="tests.tasks.multiply">' in page
    assert 'id="dtq-preview"' in page and "periodic_task.js" in page
    assert 'name="kind"' in page and 'value="Europe/Berlin"' in page


def test_a_crontab_schedule_is_saved_with_its_next_run(admin: Client) -> None:
    response = admin.post(ADD_URL, form(crontab=" 30  2 * * * "))
    assert response.status_code == 302, errors(response)
    row = PeriodicTask.objects.get()
    assert (row.crontab, row.timezone, row.args, row.interval) == (
        "30 2 * * *", "Europe/Berlin", [6, 7], None)
    assert row.next_run_at is not None and row.next_run_at > timezone.now()
    assert timezone.localtime(row.next_run_at, row.schedule().tz).strftime("%H:%M") == "02:30"


def test_only_the_chosen_schedule_type_is_kept(admin: Client) -> None:
    response = admin.post(ADD_URL, form(kind="interval", interval="00:05:00"))
    assert response.status_code == 302, errors(response)
    row = PeriodicTask.objects.get()
    assert (row.crontab, row.interval, row.run_at) == ("", timedelta(minutes=5), None)


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"crontab": "30 2 * *"}, "crontab", "has 4 field(s); it needs five"),
    ({"crontab": "99 * * * *"}, "crontab", "is not valid"),
    ({"kind": "interval"}, "interval", "Required for this schedule type."),
    ({"kind": "interval", "interval": "00:00:00"}, "interval", "longer than zero"),
    ({"args": "[1]"}, "args", "tests.tasks.multiply(x, y) cannot take these"),
    ({"args": "[]", "kwargs": '{"z": 1}'}, "kwargs", "cannot take these arguments"),
    ({"args": '{"x": 1}'}, "args", "A JSON list"),
    ({"args": "[1,"}, "args", "Enter a valid JSON"),
    ({"task": "not.a.task"}, "task", "Select a valid choice"),
])
def test_a_bad_field_is_refused_with_the_error_on_that_field(
        admin: Client, fields: dict[str, str], field: str, says: str) -> None:
    response = admin.post(ADD_URL, form(**fields))
    assert response.status_code == 200
    found = errors(response)
    assert field in found and any(says in message for message in found[field]), found
    assert not PeriodicTask.objects.exists()


def test_the_preview_describes_the_schedule_and_its_next_five_runs(admin: Client) -> None:
    answer = admin.get(PREVIEW_URL, {"kind": "crontab", "crontab": "30 2 * * 1-5",
                                     "timezone": "America/New_York"}).json()
    assert answer["ok"]
    lines = answer["text"].splitlines()
    assert lines[0] == "At 02:30, Monday through Friday (America/New_York)"
    assert len(lines) == 6 and all(" 02:30:00 E" in line for line in lines[1:])
    wrong = admin.get(PREVIEW_URL, {"kind": "crontab", "crontab": "30 2 *"}).json()
    assert not wrong["ok"] and "it needs five" in wrong["text"]
    every = admin.get(PREVIEW_URL, {"kind": "interval", "interval": "01:30:00"}).json()
    assert every["text"].splitlines()[0] == "Every 1 hour 30 minutes"


def test_the_list_shows_the_schedule_in_words_and_links_a_failed_last_run(admin: Client) -> None:
    row = PeriodicTask.objects.create(name="nightly", task="tests.tasks.multiply",
                                      crontab="30 2 * * *", timezone="Europe/Berlin")
    PeriodicTask.objects.filter(pk=row.pk).update(last_run_at=timezone.now())
    PeriodicRun.objects.create(periodic_task=row, slot=timezone.now(), task_id="t-1")
    failure = TaskResult.objects.create(task_id="t-1", task_name="tests.tasks.multiply",
                                        status=TaskState.FAILURE, date_done=timezone.now())
    page = admin.get(LIST_URL).content.decode()
    assert "At 02:30 (Europe/Berlin)" in page
    assert f'/admin/django_tasks_q/taskresult/{failure.pk}/change/">FAILURE</a>' in page


def test_actions_run_now_enable_and_disable(admin: Client) -> None:
    row = PeriodicTask.objects.create(name="every-minute", task="tests.tasks.multiply",
                                      crontab="* * * * *", args=[2, 3])
    post = {"_selected_action": [row.pk], "index": 0}
    response = admin.post(LIST_URL, {**post, "action": "disable"}, follow=True)
    assert "Disabled 1 periodic task(s)." in response.content.decode()
    row.refresh_from_db()
    assert not row.enabled and row.next_run_at is None
    admin.post(LIST_URL, {**post, "action": "enable"})
    row.refresh_from_db()
    assert row.enabled and row.next_run_at is not None
    response = admin.post(LIST_URL, {**post, "action": "run_now"}, follow=True)
    assert "Sent tests.tasks.multiply[" in response.content.decode()


def test_a_view_only_user_sees_the_list_and_can_trigger_nothing(viewer: Client) -> None:
    row = PeriodicTask.objects.create(name="every-minute", task="tests.tasks.multiply",
                                      crontab="* * * * *")
    page = viewer.get(LIST_URL)
    assert page.status_code == 200 and "every-minute" in page.content.decode()
    for action in ("run_now", "enable", "disable"):
        assert f'value="{action}"' not in page.content.decode()
        response = viewer.post(LIST_URL, {"_selected_action": [row.pk], "index": 0,
                                          "action": action}, follow=True)
        assert "Sent " not in response.content.decode()
    row.refresh_from_db()
    assert row.enabled
    assert viewer.post(ADD_URL, form()).status_code == 403


def test_a_bound_task_is_checked_without_its_self(admin: Client) -> None:
    ok = admin.post(ADD_URL, form(task="tests.tasks.retries_then_ok", args="[2]"))
    assert ok.status_code == 302, errors(ok)
    wrong = admin.post(ADD_URL, form(name="other", task="tests.tasks.retries_then_ok",
                                     args="[2, 3]"))
    assert "tests.tasks.retries_then_ok(succeed_on) cannot take these" in errors(wrong)["args"][0]


def test_a_schedule_defined_in_code_can_only_be_enabled_or_disabled_here(admin: Client) -> None:
    row = PeriodicTask.objects.create(name="from-code", task="tests.tasks.multiply",
                                      crontab="*/5 * * * *", args=[1, 2], from_code=True)
    url = f"/admin/django_tasks_q/periodictask/{row.pk}/change/"
    page = admin.get(url).content.decode()
    assert 'name="enabled"' in page and 'name="crontab"' not in page and 'name="kind"' not in page
    response = admin.post(url, {"crontab": "0 0 * * *", "args": "[9, 9]"})
    assert response.status_code == 302
    row.refresh_from_db()
    assert not row.enabled and row.crontab == "*/5 * * * *" and row.args == [1, 2]


def test_the_preview_is_for_those_who_may_see_periodic_tasks(client: Client) -> None:
    user = User.objects.create_user("other", "other@example.com", "pw", is_staff=True)
    client.force_login(user)
    assert client.get(PREVIEW_URL, {"kind": "crontab", "crontab": "* * * * *"}).status_code == 403
