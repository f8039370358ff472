"""The healthchecks.io protocol's URLs, and how a ping URL may be shown."""

from __future__ import annotations

import pytest

from ops.pings import ping_url, shown, suffix_for
from ops.secrets import Secret


@pytest.mark.parametrize(("code", "suffix"), [(0, ""), (1, "/1"), (3, "/3"), (75, "/75"), (130, "/130"),
                                               (None, "/fail")])
def test_the_suffix_says_success_the_exit_code_or_fail(code, suffix):
    assert suffix_for(code) == suffix


def test_the_suffix_goes_on_the_path_and_rid_into_the_query():
    assert ping_url("https://hc-ping.com/abc-123", "/start", "r1") == "https://hc-ping.com/abc-123/start?rid=r1"
    assert ping_url("https://hc-ping.com/abc-123/", "", "r1") == "https://hc-ping.com/abc-123?rid=r1"
    assert (ping_url("https://kuma.example/api/push/tok?status=up", "/3", "r2")
            == "https://kuma.example/api/push/tok/3?status=up&rid=r2")


def test_a_ping_url_is_shown_without_its_path_or_credentials():
    assert shown(Secret("https://hc-ping.com/5f0c1d2e-secret")) == "https://hc-ping.com/…"
    assert shown("http://user:pw@127.0.0.1:8000/ping/key/slug?x=1") == "http://127.0.0.1:8000/…"
