"""The profile tables: one section per chapter, copies handed out, clear errors for unknown names."""

from __future__ import annotations

import pytest

from simmerge_lib import profiles


def test_every_section_defines_every_profile():
    for section, table in profiles.TABLES.items():
        assert set(table) == set(profiles.PROFILES), section


def test_settings_are_copies():
    first = profiles.settings("multiway", "smoke")
    first["ks"].append(99)
    assert 99 not in profiles.settings("multiway", "smoke")["ks"]


def test_unknown_section_or_profile_is_named():
    with pytest.raises(ValueError, match="unknown profile section 'labelz'.*labels"):
        profiles.settings("labelz", "smoke")
    with pytest.raises(ValueError, match="unknown profile 'tiny' for labels.*default"):
        profiles.settings("labels", "tiny")
