"""The bench emulator's speed patch to moto answers as stock moto does."""

from __future__ import annotations

from bench import moto_patch


def test_patched_moto_answers_as_stock_moto_does() -> None:
    moto_patch.verify()  # also checks concurrent receives take each message once
    assert not moto_patch.is_applied()
