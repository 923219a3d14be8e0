"""Replica slots: names, and which slot each planned owner of a queue takes."""

from __future__ import annotations

from sqsbalancerd.coordination.replicas import base_of, place, slot_name, split


def test_slot_names_round_trip_and_plain_names_are_slot_zero() -> None:
    assert slot_name("orders", 0) == "orders"
    assert split(slot_name("orders", 3)) == ("orders", 3)
    assert split("orders.fifo") == ("orders.fifo", 0)
    assert split("a#r") == ("a#r", 0) and split("a#r01") == ("a#r01", 0)  # not ours
    assert base_of("orders#r12") == "orders"


def test_current_holders_keep_their_slots_and_newcomers_take_the_lowest_free() -> None:
    owners = {"hot": "a", "hot#r2": "c", "cold": "b"}
    placed = place({"hot": ("a", "b", "c", "d"), "cold": ("b",)}, owners)
    assert placed == {"hot": "a", "hot#r1": "b", "hot#r2": "c", "hot#r3": "d", "cold": "b"}


def test_a_shrinking_queue_keeps_the_remaining_owners_where_they_are() -> None:
    owners = {"hot": "a", "hot#r1": "b", "hot#r2": "c"}
    assert place({"hot": ("c",)}, owners) == {"hot#r2": "c"}
    # Only a new owner fills slot 0 again.
    assert place({"hot": ("c", "d")}, owners) == {"hot": "d", "hot#r2": "c"}


def test_a_member_holding_two_slots_of_a_queue_keeps_the_lowest() -> None:
    assert place({"hot": ("a",)}, {"hot#r1": "a", "hot#r3": "a"}) == {"hot#r1": "a"}
