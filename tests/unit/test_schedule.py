"""Tests for mailsrv.outbound.retry: backoff, jitter, expiry, delay warnings (pure)."""

from __future__ import annotations

import random

import pytest

from mailsrv.outbound.retry import DEFAULT_RETRY_SCHEDULE, RetryPolicy


def test_default_schedule_is_the_documented_one() -> None:
    assert DEFAULT_RETRY_SCHEDULE == (60, 300, 900, 1800, 3600, 7200, 14400)


@pytest.mark.parametrize("attempts, base", [(1, 60), (2, 300), (3, 900), (7, 14400), (50, 14400)])
def test_delay_grows_then_repeats_within_jitter(attempts: int, base: float) -> None:
    policy = RetryPolicy()
    rng = random.Random(7)
    delays = [policy.delay(attempts, rng) for _ in range(200)]
    assert all(0.9 * base <= d <= 1.1 * base for d in delays)
    assert len(set(delays)) > 100  # jitter actually spreads them


def test_zero_attempts_uses_the_first_delay() -> None:
    assert 54 <= RetryPolicy().delay(0, random.Random(1)) <= 66


def test_next_attempt_and_expiry() -> None:
    policy = RetryPolicy(schedule=(60,), max_age=1000)
    rng = random.Random(3)
    when = policy.next_attempt(created=0, now=100, attempts=1, rng=rng)
    assert when is not None and 154 <= when <= 166
    # A retry that would fall after the end of life is moved to the deadline ...
    assert policy.next_attempt(created=0, now=990, attempts=5, rng=rng) == 1000
    # ... and a failure at (or after) the deadline is final.
    assert policy.next_attempt(created=0, now=1000, attempts=6, rng=rng) is None
    assert policy.next_attempt(created=0, now=5000, attempts=6, rng=rng) is None
    assert policy.expires(10) == 1010


def test_delay_warning() -> None:
    off = RetryPolicy()
    assert not off.warn_due(created=0, now=10**9, warned=False)
    policy = RetryPolicy(delay_warning=3600)
    assert not policy.warn_due(created=0, now=3599, warned=False)
    assert policy.warn_due(created=0, now=3600, warned=False)
    assert not policy.warn_due(created=0, now=7200, warned=True)
