import json

import pytest

from ops.secrets import MASK, Secret, mask_identifier, masked, redact


def test_secret_never_prints_itself():
    secret = Secret("hunter2-very-secret")
    assert str(secret) == MASK
    assert repr(secret) == f"Secret({MASK})"
    assert f"{secret}" == MASK and f"{secret:>30}" == MASK
    assert "%s" % secret == MASK  # noqa: UP031 - the old formatting must mask too
    assert secret.reveal() == "hunter2-very-secret"
    with pytest.raises(TypeError):
        json.dumps(secret)
    assert json.dumps(masked({"k": secret})) == json.dumps({"k": MASK})


@pytest.mark.parametrize(("text", "expected"), [
    ("postgresql://app:s3cr3t-pass@db:5432/app", f"postgresql://app:{MASK}@db:5432/app"),
    ("redis://:tok3n@cache:6379", f"redis://:{MASK}@cache:6379"),
    ("host=db password=abc123 user=x", f"host=db password={MASK} user=x"),
    ("password='quoted value' host=db", f"password={MASK} host=db"),
    ("https://example.com/path@x", "https://example.com/path@x"),
    ("no secrets here", "no secrets here"),
])
def test_redact_masks_url_and_keyword_passwords(text, expected):
    assert redact(text) == expected


def test_redact_masks_every_known_secret_value_longest_first():
    Secret("abcd-1234-token")
    Secret("abcd-1234")
    assert redact("token=abcd-1234-token and abcd-1234!") == f"token={MASK} and {MASK}!"


def test_short_values_are_not_masked_everywhere():
    Secret("on")
    assert redact("online") == "online"


@pytest.mark.parametrize(("value", "expected"), [("AKIAIOSFODNN7EXAMPLE", "AKIA…MPLE"), ("short", MASK)])
def test_mask_identifier(value, expected):
    assert mask_identifier(value) == expected


def test_secret_store_updates_and_deletes_atomically_and_privately(tmp_path):
    import stat

    from ops.secret_store import SecretStore

    store = SecretStore(tmp_path, "staging")
    store.update({"A": Secret("one"), "B": Secret("two"), "C": Secret("three")})
    store.delete("A", "B", "MISSING")
    assert {k: v.reveal() for k, v in store.read().items()} == {"C": "three"}
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert [path.name for path in store.path.parent.iterdir()] == ["staging.env"]  # no temporary left
