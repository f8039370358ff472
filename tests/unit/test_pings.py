"""The healthchecks.io protocol's URLs, and how a ping URL may be shown."""

from __future__ import annotations

import socket
import time

import pytest

from ops.pings import Monitor, Ping, deliver, ping_url, shown, suffix_for
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


def test_a_monitor_that_never_answers_times_out_after_one_retry_with_one_warning(capsys):
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        ping = Ping("backup", "prod", Monitor(Secret(f"http://127.0.0.1:{port}/ping/token-7"), timeout=0.3))
        began = time.monotonic()
        assert deliver(ping, "/start", "opsbook backup on prod: started", start=True) is False
        assert time.monotonic() - began < 3
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: could not ping the monitor of backup on prod") and "timed out" in line
    assert f"http://127.0.0.1:{port}/…" in line and "token-7" not in line and "2 attempt(s)" in line
