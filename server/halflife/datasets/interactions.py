"""Interaction datasets from CSV: a user/item/value/timestamp file plus an item-text file.

MovieLens (ml-latest-small and the other "latest" releases) is one preset;
any dataset in the same shape loads with `DatasetFormat` naming its columns:

    interactions.csv   user, item, value, unix timestamp (one row per rating/event)
    items.csv          item id, text columns, optional category column ("A|B|C")
    texts.csv          optional user-written text: user, item, text, timestamp

MovieLens is for non-commercial research use under its own licence (see its
README): cite F. Maxwell Harper and Joseph A. Konstan, "The MovieLens
Datasets: History and Context", ACM TiiS 5(4), 2015.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import re
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetFormat:
    interactions_file: str
    items_file: str
    texts_file: str | None
    user_column: str
    item_column: str
    value_column: str
    time_column: str
    text_columns: tuple[str, ...]  # item text: these columns joined
    category_column: str | None
    category_separator: str = "|"
    no_category: str = ""  # the value meaning "no categories"
    user_text_column: str = "text"


MOVIELENS = DatasetFormat(
    interactions_file="ratings.csv",
    items_file="movies.csv",
    texts_file="tags.csv",
    user_column="userId",
    item_column="movieId",
    value_column="rating",
    time_column="timestamp",
    text_columns=("title",),
    category_column="genres",
    no_category="(no genres listed)",
    user_text_column="tag",
)


@dataclasses.dataclass(frozen=True)
class CatalogItem:
    id: str
    text: str  # title and categories in one line, what gets embedded
    categories: tuple[str, ...]
    create_time: float | None  # from a "(1995)" year in the title, when present


@dataclasses.dataclass(frozen=True)
class Interactions:
    """Parallel arrays, sorted by time (ties by file order)."""

    users: np.ndarray  # (n,) str
    items: np.ndarray  # (n,) str
    values: np.ndarray  # (n,) float64
    times: np.ndarray  # (n,) float64 unix seconds

    def __len__(self) -> int:
        return self.users.shape[0]


@dataclasses.dataclass(frozen=True)
class UserTexts:
    users: np.ndarray
    items: np.ndarray
    texts: np.ndarray  # (n,) str
    times: np.ndarray


@dataclasses.dataclass(frozen=True)
class Dataset:
    items: list[CatalogItem]
    interactions: Interactions
    texts: UserTexts


_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _year_start(title: str) -> float | None:
    found = _YEAR.search(title)
    if not found:
        return None
    return dt.datetime(int(found.group(1)), 1, 1, tzinfo=dt.timezone.utc).timestamp()


def _rows(path: Path):
    with open(path, newline="", encoding="utf-8") as handle:
        yield from csv.DictReader(handle)


def _sorted_by_time(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.argsort(columns["times"], kind="stable")
    return {name: values[order] for name, values in columns.items()}


def load_dataset(directory: str | Path, fmt: DatasetFormat = MOVIELENS) -> Dataset:
    """Reads a dataset directory; raises FileNotFoundError or KeyError (a
    missing column) with the file named."""
    directory = Path(directory)
    items = []
    for row in _rows(directory / fmt.items_file):
        text = " ".join(row[c] for c in fmt.text_columns).strip()
        categories: tuple[str, ...] = ()
        if fmt.category_column:
            raw = row[fmt.category_column]
            if raw and raw != fmt.no_category:
                categories = tuple(raw.split(fmt.category_separator))
        full_text = f"{text}. Genres: {', '.join(categories)}" if categories else text
        items.append(CatalogItem(row[fmt.item_column], full_text, categories, _year_start(text)))

    rows = list(_rows(directory / fmt.interactions_file))
    interactions = Interactions(
        **_sorted_by_time(
            {
                "users": np.array([r[fmt.user_column] for r in rows]),
                "items": np.array([r[fmt.item_column] for r in rows]),
                "values": np.array([float(r[fmt.value_column]) for r in rows]),
                "times": np.array([float(r[fmt.time_column]) for r in rows]),
            }
        )
    )
    texts_path = directory / fmt.texts_file if fmt.texts_file else None
    text_rows = list(_rows(texts_path)) if texts_path and texts_path.is_file() else []
    texts = UserTexts(
        **_sorted_by_time(
            {
                "users": np.array([r[fmt.user_column] for r in text_rows], dtype=str),
                "items": np.array([r[fmt.item_column] for r in text_rows], dtype=str),
                "texts": np.array([r[fmt.user_text_column] for r in text_rows], dtype=str),
                "times": np.array([float(r[fmt.time_column]) for r in text_rows], dtype=np.float64),
            }
        )
    )
    return Dataset(items=items, interactions=interactions, texts=texts)
