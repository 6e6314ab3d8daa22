"""The shared error mapping: statuses, retry-after forms and redaction, as tables."""

from __future__ import annotations

import argparse
import email.utils
import time

import pytest

from mesh.errors import (
    ConfigError,
    InvalidTaskError,
    RateLimitedError,
    TransientError,
    WorkerFatalError,
)
from workers.backends._errors import error_for_status, redact, retry_after_s
from workers.config import worker_settings_from


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, None),
        ({}, None),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "whenever"}, None),
    ],
)
def test_retry_after_forms(headers: dict[str, str] | None, expected: float | None) -> None:
    assert retry_after_s(headers) == expected


def test_retry_after_as_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    delay_s = retry_after_s({"retry-after": when})
    assert delay_s is not None
    assert 28 <= delay_s <= 31


@pytest.mark.parametrize(
    ("status", "error_class", "phrase"),
    [
        (429, RateLimitedError, "rate limiting (429)"),
        (401, WorkerFatalError, "refused this worker's credentials (401)"),
        (403, WorkerFatalError, "refused this worker's credentials (403)"),
        (404, WorkerFatalError, "does not serve model 'm' (404)"),
        (400, InvalidTaskError, "rejected the task (400)"),
        (413, InvalidTaskError, "rejected the task (413)"),
        (422, InvalidTaskError, "rejected the task (422)"),
        (408, TransientError, "failed (408)"),
        (409, TransientError, "failed (409)"),
        (500, TransientError, "failed (500)"),
        (503, TransientError, "failed (503)"),
        (418, TransientError, "failed (418)"),
    ],
)
def test_each_status_maps_to_one_mesh_error(status: int, error_class: type, phrase: str) -> None:
    error = error_for_status(status, "detail", provider="P", model="m", delay_s=3.0)
    assert type(error) is error_class
    assert phrase in str(error)
    if isinstance(error, RateLimitedError):
        assert error.delay_s == 3.0


def test_redact_hides_secrets_and_cuts_long_text() -> None:
    assert redact("bad key sk-123 given", "sk-123", None) == "bad key *** given"
    long = redact("x" * 1000)
    assert len(long) == 300
    assert long.endswith("...")
    assert redact("two\n  lines") == "two lines"


def _args(**overrides: object) -> argparse.Namespace:
    fields: dict[str, object] = {
        "backend": "echo",
        "model": None,
        "concurrency": None,
        "worker_id": None,
        "no_any": False,
        "base_url": None,
        "timeout_s": None,
        "pull": False,
        "grace_s": None,
        "rpm": None,
    }
    fields.update(overrides)
    return argparse.Namespace(**fields)


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        (None, {}, None),
        (30.0, {}, 30.0),
        (None, {"D8_RPM": "12"}, 12.0),
        (5.0, {"D8_RPM": "12"}, 5.0),
    ],
)
def test_rpm_comes_from_the_flag_or_d8_rpm(
    flag: float | None, env: dict[str, str], expected: float | None
) -> None:
    settings = worker_settings_from(_args(rpm=flag), env)
    assert settings.backend_settings.rpm == expected


def test_a_negative_rpm_is_refused() -> None:
    with pytest.raises(ConfigError, match="--rpm -1: use a positive number"):
        worker_settings_from(_args(rpm=-1.0), {})


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        ({"grace_s": -1.0}, {}, "--grace-s -1 is below 0"),
        ({"timeout_s": 0.0}, {}, "--timeout-s 0 is below 1"),
        ({}, {"D8_GRACE_S": "-5"}, "D8_GRACE_S=-5 is below 0"),
    ],
)
def test_a_negative_duration_is_refused(
    overrides: dict[str, float], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        worker_settings_from(_args(**overrides), env)
