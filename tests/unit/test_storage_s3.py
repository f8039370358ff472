"""Multipart progress counts only the bytes stored from the start of the object."""

from ops.storage.s3_multipart import _StoredPrefix


def test_a_part_finishing_early_is_reported_once_the_parts_before_it_are_stored():
    reported: list[int] = []
    progress = _StoredPrefix(reported.append)
    progress.stored(1, 5)
    progress.stored(3, 2)  # the short last part, before part 2
    assert reported == [5]
    progress.stored(2, 5)
    assert reported == [5, 10, 12]
