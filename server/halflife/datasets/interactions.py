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
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from halflife.texts import MAX_CATEGORIES, MAX_CATEGORY_BYTES, name_problem, text_problem


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
    value_range: tuple[float, float] = (-math.inf, math.inf)  # values outside it are refused
    where_to_get: str = ""  # said when the directory is missing
    terms: str = ""  # the data's licence terms, stated with results derived from it (halflife eval's tables)


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
    value_range=(0.5, 5.0),  # stars, in half steps (the dataset's README)
    where_to_get="MovieLens releases are at https://grouplens.org/datasets/movielens/ (ml-latest-small.zip, unzipped)",
    # What its README's licence asks of results from it: acknowledgement by this citation, no implied endorsement,
    # non-commercial use.
    terms="MovieLens data from GroupLens Research (University of Minnesota), used under the licence in its README: "
          "non-commercial research use only, no endorsement by the University of Minnesota or GroupLens stated or "
          "implied. Cite F. Maxwell Harper and Joseph A. Konstan, \"The MovieLens Datasets: History and Context\", "
          "ACM TiiS 5(4), 2015, https://doi.org/10.1145/2827872.",
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
    if not found or int(found.group(1)) < 1:  # "(0000)" is no year a date can hold
        return None
    return dt.datetime(int(found.group(1)), 1, 1, tzinfo=dt.timezone.utc).timestamp()


# Unix seconds a date can hold (years 1 to 9999), as the API's Timestamps do.
_MIN_TIME = dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc).timestamp()
_MAX_TIME = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc).timestamp()


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message is one line naming
    the file, the line (1-based, the header is line 1) and the column."""


class _Csv:
    """One CSV file as lists of strings, each row checked against the header's
    width; `columns` must be in the header, and a row must follow unless empty_ok."""

    def __init__(self, path: Path, columns: Sequence[str], empty_ok: bool = False):
        self.path, self.name = path, path.name
        try:
            # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name.
            with open(path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                self.header = next(reader, None)
                self._check_header(columns)
                width, rows = len(self.header), []
                for row in reader:
                    if len(row) != width:
                        if not row:
                            continue  # a blank line, skipped as csv.DictReader does
                        raise DatasetError(f"{self.name} line {reader.line_num}: {len(row)} fields, "
                                           f"expected {width} ({','.join(self.header)})")
                    rows.append(row)
        except FileNotFoundError:
            raise DatasetError(f"{self.name}: not found in {path.parent}") from None
        except UnicodeDecodeError:
            raise DatasetError(self._not_utf8()) from None
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
            raise DatasetError(f"{self.name} line {reader.line_num}: {exc}") from None
        except OSError as exc:
            raise DatasetError(f"{self.name}: cannot read: {exc.strerror}") from None
        if not rows and not empty_ok:
            raise DatasetError(f"{self.name}: no rows after the header")
        self.rows = rows

    def _check_header(self, columns: Sequence[str]) -> None:
        if self.header is None:
            raise DatasetError(f"{self.name}: empty file")
        missing = [c for c in columns if c not in self.header]
        if missing:
            raise DatasetError(f"{self.name}: no column {', '.join(map(repr, missing))} (header: {','.join(self.header)})")
        # Which of two same-named columns holds the data is a guess: the first was read before.
        repeated = [c for c in columns if self.header.count(c) > 1]
        if repeated:
            raise DatasetError(f"{self.name}: column {', '.join(map(repr, repeated))} appears more than once "
                               f"(header: {','.join(self.header)})")

    def _not_utf8(self) -> str:
        # The text decoder reports offsets within its buffer; decoding the bytes finds the file offset.
        data = self.path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            return f"{self.name} line {line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        return f"{self.name}: not UTF-8"

    def strings(self, column: str) -> np.ndarray:
        i = self.header.index(column)
        # object, not a fixed-width str array: that sizes every row by the longest
        # (one 30,000-character text among 60,000 short ones asked for 6.7 GiB).
        return np.array([r[i] for r in self.rows], dtype=object)

    def floats(self, column: str) -> np.ndarray:
        i = self.header.index(column)
        try:
            values = np.array([float(r[i]) for r in self.rows], dtype=np.float64)
        except ValueError:
            values = None  # find the row below, outside this handler, for a message without a chained traceback
        if values is not None and np.isfinite(values).all():
            return values
        k = next(k for k, r in enumerate(self.rows) if not _is_finite_number(r[i]))
        raise self.error_at(k, f"{column} {self.rows[k][i]!r} is not a number")

    def bounded(self, column: str, low: float, high: float, what: str) -> np.ndarray:
        """`floats`, each within [low, high] (`what` names them in the error)."""
        values = self.floats(column)
        bad = np.flatnonzero((values < low) | (values > high))
        if bad.size:
            k = int(bad[0])
            raise self.error_at(k, f"{column} {self.rows[k][self.header.index(column)]!r} is not {what}")
        return values

    def times(self, column: str, earliest: float, latest: float) -> np.ndarray:
        """`floats`, each a Unix time from `earliest` to `latest` (1e20 crashed the load later)."""
        return self.bounded(column, earliest, latest, f"a time from {_iso(earliest)} to {_iso(latest)}")

    def names(self, column: str) -> np.ndarray:
        """`strings`, each a valid id (`texts.name_problem`): one the server
        refused stopped load-movielens midway, some batches stored."""
        self._refuse_first(column, name_problem)
        return self.strings(column)

    def check_unique(self, *columns: str) -> None:
        """No value of `columns` (together) twice: a repeated item id replaced
        the first row unsaid; a user's second rating of an item was a second
        event of one id, refused or dropped by where the batches split."""
        at, first = [self.header.index(c) for c in columns], {}
        for k, row in enumerate(self.rows):
            if first.setdefault(value := tuple(row[i] for i in at), k) != k:
                named = " ".join(f"{c} {v!r}" for c, v in zip(columns, value))
                raise self.error_at(k, f"{named} repeats line {self._line_of(first[value])}")

    def texts(self, column: str) -> np.ndarray:
        """`strings`, each a text the API takes (`text_problem`): a blank tag
        would stand for its item alone, a long one stopped load-movielens midway."""
        values = self.strings(column)
        for k, text in enumerate(values):
            if (problem := text_problem(text)) is not None:
                raise self.error_at(k, f"{column} {problem}")
        return values

    def error_at(self, k: int, problem: str) -> DatasetError:
        """The DatasetError for rows[k], naming its line."""
        return DatasetError(f"{self.name} line {self._line_of(k)}: {problem}")

    def check_categories(self, fmt: DatasetFormat) -> None:
        """Each row's categories valid for the API (`texts.name_problem`, at
        most MAX_CATEGORIES): one the server refused stopped load-movielens
        midway, some batches stored."""
        def problem_of(raw: str) -> str | None:
            names = _categories(raw, fmt)
            if len(names) > MAX_CATEGORIES:
                return f"holds {len(names)} categories; at most {MAX_CATEGORIES}"
            return next((f"has the category {name!r}, which {problem}" for name in names
                         if (problem := name_problem(name, MAX_CATEGORY_BYTES)) is not None), None)

        self._refuse_first(fmt.category_column, problem_of)

    def check_known(self, column: str, known: set[str], what: str) -> None:
        """Every value of `column` in `known`: a reference to an item the items
        file lacks stopped load-movielens midway and was dropped by eval unsaid."""
        self._refuse_first(column, lambda value: None if value in known else f"is not in {what}")

    def _refuse_first(self, column: str, problem_of: Callable[[str], str | None]) -> None:
        """DatasetError for the first row whose `column` value has a problem
        (problem_of: value -> what is wrong, or None), naming its line."""
        i = self.header.index(column)
        for k, row in enumerate(self.rows):
            if (problem := problem_of(row[i])) is not None:
                raise self.error_at(k, f"{column} {row[i]!r} {problem}")

    def _line_of(self, k: int) -> int:
        """The line number of rows[k]: re-read (errors only), since a quoted
        field may span lines and blank lines are skipped."""
        with open(self.path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            next(reader)
            for row in reader:
                if row:
                    k -= 1
                    if k < 0:
                        return reader.line_num
        raise AssertionError("row index beyond the file")


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _is_finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _categories(raw: str, fmt: DatasetFormat) -> tuple[str, ...]:
    return tuple(raw.split(fmt.category_separator)) if raw and raw != fmt.no_category else ()


def _sorted_by_time(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.argsort(columns["times"], kind="stable")
    return {name: values[order] for name, values in columns.items()}


def load_dataset(directory: str | Path, fmt: DatasetFormat = MOVIELENS, *, earliest: float = _MIN_TIME,
                 latest: float = _MAX_TIME) -> Dataset:
    """Reads a dataset directory; raises DatasetError, naming the file, line
    and column, for a missing or malformed file. Ids and categories are
    valid for the API (`texts.name_problem`), item ids unique; times lie
    within [earliest, latest] (default: any a date can hold, years 1 to 9999)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a directory" + (f"; {fmt.where_to_get}" if fmt.where_to_get else ""))
    columns = [fmt.item_column, *fmt.text_columns] + ([fmt.category_column] if fmt.category_column else [])
    table = _Csv(directory / fmt.items_file, columns)
    table.names(fmt.item_column)
    table.check_unique(fmt.item_column)
    if fmt.category_column:
        table.check_categories(fmt)
    header = table.header
    id_at, text_at = header.index(fmt.item_column), [header.index(c) for c in fmt.text_columns]
    category_at = header.index(fmt.category_column) if fmt.category_column else None
    items = []
    for k, row in enumerate(table.rows):
        text = " ".join(row[i] for i in text_at).strip()
        categories = _categories(row[category_at], fmt) if category_at is not None else ()
        full_text = f"{text}. Genres: {', '.join(categories)}" if categories else text
        if (problem := text_problem(full_text)) is not None:  # the server embeds it: it refused these midway
            raise table.error_at(k, f"{' and '.join(fmt.text_columns)}: the item's text {problem}")
        items.append(CatalogItem(row[id_at], full_text, categories, _year_start(text)))

    known = {item.id for item in items}
    table = _Csv(directory / fmt.interactions_file, [fmt.user_column, fmt.item_column, fmt.value_column, fmt.time_column])
    table.check_known(fmt.item_column, known, fmt.items_file)
    table.check_unique(fmt.user_column, fmt.item_column)
    interactions = Interactions(
        **_sorted_by_time(
            {
                "users": table.names(fmt.user_column),
                "items": table.strings(fmt.item_column),
                "values": table.bounded(fmt.value_column, *fmt.value_range,
                                        f"from {fmt.value_range[0]:g} to {fmt.value_range[1]:g}"),
                "times": table.times(fmt.time_column, earliest, latest),
            }
        )
    )
    texts_path = directory / fmt.texts_file if fmt.texts_file else None
    # Optional: no file, no texts. One that is there but cannot be read (a directory, a link to nothing) is an error.
    if texts_path and (texts_path.exists() or texts_path.is_symlink()):
        table = _Csv(texts_path, [fmt.user_column, fmt.item_column, fmt.user_text_column, fmt.time_column], empty_ok=True)
        table.check_known(fmt.item_column, known, fmt.items_file)
        texts = UserTexts(
            **_sorted_by_time(
                {
                    "users": table.names(fmt.user_column),
                    "items": table.strings(fmt.item_column),
                    "texts": table.texts(fmt.user_text_column),
                    "times": table.times(fmt.time_column, earliest, latest),
                }
            )
        )
    else:
        empty = np.array([], dtype=object)
        texts = UserTexts(users=empty, items=empty, texts=empty, times=np.array([], dtype=np.float64))
    return Dataset(items=items, interactions=interactions, texts=texts)
