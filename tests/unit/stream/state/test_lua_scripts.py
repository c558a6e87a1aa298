"""The Redis store's Lua scripts are package files: each is found, non-empty and loaded.

They moved out of Python strings (issue 16); a file missing from the wheel (package data
in pyproject.toml) would only show when the worker first talks to Redis.
"""

from __future__ import annotations

from importlib import resources

import pytest

import stream.state.redis_store as redis_store

SCRIPTS = (
    "item_lib",
    "apply_item",
    "apply_items",
    "apply_partition",
    "read_windows",
    "save_latest",
)


def test_the_lua_directory_holds_exactly_the_scripts() -> None:
    lua = resources.files("stream.state").joinpath("lua")
    names = {f.name for f in lua.iterdir() if f.name.endswith(".lua")}
    assert names == {f"{name}.lua" for name in SCRIPTS}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_file_is_found_and_non_empty(name: str) -> None:
    source = redis_store._script(name)
    assert source.strip()
    assert source.isascii()


def test_the_store_sends_the_files_unchanged() -> None:
    script = redis_store._script
    sent = {
        "apply_item": redis_store._APPLY_ITEM,
        "apply_items": redis_store._APPLY_ITEMS,
        "apply_partition": redis_store._APPLY_PARTITION,
        "read_windows": redis_store._READ_WINDOWS,
        "save_latest": redis_store._SAVE_LATEST,
    }
    # The item scripts are the shared functions followed by their own main chunk.
    files = {
        "apply_item": script("item_lib") + script("apply_item"),
        "apply_items": script("item_lib") + script("apply_items"),
        "apply_partition": script("apply_partition"),
        "read_windows": script("read_windows"),
        "save_latest": script("save_latest"),
    }
    assert files == sent
