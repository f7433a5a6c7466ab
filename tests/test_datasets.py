"""The CSV dataset loader: MovieLens loads as before, and every malformed
file gives one DatasetError line naming the file, the line and the column."""

from __future__ import annotations

from pathlib import Path

import pytest

from halflife.datasets.interactions import DatasetError, load_dataset
from tests.fakes import MOVIELENS, MOVIELENS_MISSING

MOVIES = 'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n2,"Heat, The (1995)",(no genres listed)\n'
RATINGS = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,2.5,964981247\n2,1,5.0,964982224\n"
TAGS = "userId,movieId,tag,timestamp\n2,1,pixar,1445714994\n"
RATINGS_HEADER = "(userId,movieId,rating,timestamp)"


def dataset(tmp_path: Path, movies=MOVIES, ratings=RATINGS, tags=TAGS) -> Path:
    """A tiny MovieLens-shaped directory; str is written as UTF-8, bytes as they are, None leaves the file out."""
    for name, content in (("movies.csv", movies), ("ratings.csv", ratings), ("tags.csv", tags)):
        if content is not None:
            data = content.encode("utf-8") if isinstance(content, str) else content
            (tmp_path / name).write_bytes(data)
    return tmp_path


def error(directory: Path) -> str:
    with pytest.raises(DatasetError) as caught:
        load_dataset(directory)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_tiny_dataset_loads(tmp_path):
    ds = load_dataset(dataset(tmp_path))
    assert [i.id for i in ds.items] == ["1", "2"]
    assert ds.items[0].text == "Toy Story (1995). Genres: Adventure, Animation"
    assert ds.items[1].categories == () and ds.items[1].text == "Heat, The (1995)"
    assert ds.interactions.times.tolist() == sorted(ds.interactions.times.tolist())
    assert ds.interactions.values.tolist() == [2.5, 5.0, 4.0]  # by time
    assert ds.texts.texts.tolist() == ["pixar"]


def test_blank_lines_a_byte_order_mark_and_no_tags_file_are_fine(tmp_path):
    ds = load_dataset(dataset(tmp_path, ratings="\ufeff" + RATINGS + "\n", tags=None))
    assert len(ds.interactions) == 3 and len(ds.texts.users) == 0


def test_truncated_last_line(tmp_path):
    assert error(dataset(tmp_path, ratings=RATINGS + "1,31,2.5")) == f"ratings.csv line 5: 3 fields, expected 4 {RATINGS_HEADER}"


def test_truncated_tags_line(tmp_path):
    assert error(dataset(tmp_path, tags=TAGS + "2,1")) == "tags.csv line 3: 2 fields, expected 4 (userId,movieId,tag,timestamp)"


def test_extra_field(tmp_path):
    assert error(dataset(tmp_path, ratings=RATINGS + "1,31,2.5,964982703,x\n")).startswith("ratings.csv line 5: 5 fields, expected 4")


def test_not_a_number(tmp_path):
    bad = RATINGS.replace("2.5", "abc")
    assert error(dataset(tmp_path, ratings=bad)) == "ratings.csv line 3: rating 'abc' is not a number"


def test_empty_and_non_finite_numbers(tmp_path):
    assert error(dataset(tmp_path, ratings=RATINGS + "3,1,4.0,\n")) == "ratings.csv line 5: timestamp '' is not a number"
    assert error(dataset(tmp_path, ratings=RATINGS + "3,1,nan,1\n")) == "ratings.csv line 5: rating 'nan' is not a number"
    assert error(dataset(tmp_path, tags=TAGS + "3,1,x,inf\n")) == "tags.csv line 3: timestamp 'inf' is not a number"


def test_references_to_unknown_items_name_their_line(tmp_path):
    """load-movielens stopped midway on them (NOT_FOUND after thousands of
    events) and eval dropped them without a word."""
    assert error(dataset(tmp_path, ratings=RATINGS + "3,99,4.0,964982703\n")) == \
        "ratings.csv line 5: movieId '99' is not in movies.csv"
    assert error(dataset(tmp_path, ratings=RATINGS, tags=TAGS + "3,98,x,1\n")) == \
        "tags.csv line 3: movieId '98' is not in movies.csv"


def test_times_a_date_cannot_hold_and_years_that_are_none(tmp_path):
    """A timestamp of 1e20 crashed the load in a traceback (OverflowError);
    "(0000)" in a title did too (ValueError), where it is just no year; 1970
    is a year."""
    assert error(dataset(tmp_path, ratings=RATINGS + "3,1,4.0,1e20\n")) == \
        "ratings.csv line 5: timestamp '1e20' is not a time from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z"
    movies = MOVIES + "3,Nothing Year (0000),Drama\n4,Patton (1970),War\n"
    years = {item.id: item.create_time for item in load_dataset(dataset(tmp_path, movies=movies)).items}
    assert years["3"] is None and years["4"] == 0.0


def test_ratings_off_the_scale_and_blank_tags_name_their_line(tmp_path):
    """A rating of 17 was taken as a strong like, and a blank tag as an event
    on its movie alone."""
    assert error(dataset(tmp_path, ratings=RATINGS + "3,1,17,964982703\n")) == \
        "ratings.csv line 5: rating '17' is not from 0.5 to 5"
    assert error(dataset(tmp_path, ratings=RATINGS + "3,1,0,964982703\n")) == \
        "ratings.csv line 5: rating '0' is not from 0.5 to 5"
    assert error(dataset(tmp_path, ratings=RATINGS, tags=TAGS + "3,1, ,1445714994\n")) == "tags.csv line 3: tag is empty"


def test_what_the_server_would_refuse_midway_names_its_line_before_anything_is_sent(tmp_path):
    """load-movielens stopped partway, batches stored, at an item text the
    server refused (blank, or over 32 KiB), a tag over 32 KiB, and a user's
    second rating of a movie: one event id twice, refused or silently
    dropped by where the batches split (a review)."""
    assert error(dataset(tmp_path, movies=MOVIES + "3, ,(no genres listed)\n")) == \
        "movies.csv line 4: title: the item's text is empty"
    assert error(dataset(tmp_path, movies=MOVIES + f"3,{'x' * 40_000},Drama\n")) == \
        "movies.csv line 4: title: the item's text is 40015 bytes long; at most 32768"
    assert error(dataset(tmp_path, tags=TAGS + f"2,1,{'y' * 40_000},1445714995\n")) == \
        "tags.csv line 3: tag is 40000 bytes long; at most 32768"
    assert error(dataset(tmp_path, ratings=RATINGS + "1,1,0.5,1400000000\n")) == \
        "ratings.csv line 5: userId '1' movieId '1' repeats line 2"


def test_line_numbers_count_blank_lines_and_quoted_newlines(tmp_path):
    movies = MOVIES + '3,"Two\nLines (2001)",Drama\n\n4,x,Drama,extra\n'
    assert error(dataset(tmp_path, movies=movies)) == "movies.csv line 7: 4 fields, expected 3 (movieId,title,genres)"
    ratings = RATINGS.replace("\n1,1,", "\n\n1,1,", 1).replace("5.0", "five")
    assert error(dataset(tmp_path, movies=MOVIES, ratings=ratings)) == "ratings.csv line 5: rating 'five' is not a number"


def test_not_utf8(tmp_path):
    movies = MOVIES.encode().replace(b"Heat", b"H\xe9at")
    offset = movies.index(b"\xe9")
    assert error(dataset(tmp_path, movies=movies)) == f"movies.csv line 3: not UTF-8 (byte 0xe9 at offset {offset})"


def test_missing_column_names_the_file_the_column_and_the_header(tmp_path):
    bad = RATINGS.replace("userId", "user")
    assert error(dataset(tmp_path, ratings=bad)) == "ratings.csv: no column 'userId' (header: user,movieId,rating,timestamp)"
    assert error(dataset(tmp_path, ratings=RATINGS, movies="id,name\n1,x\n")) == (
        "movies.csv: no column 'movieId', 'title', 'genres' (header: id,name)")


def test_a_needed_column_named_twice_is_refused_not_guessed(tmp_path):
    lines = RATINGS.splitlines(keepends=True)
    twice = "".join([lines[0].replace("\n", ",rating\n")] + [line.replace("\n", ",1.0\n") for line in lines[1:]])
    assert error(dataset(tmp_path, ratings=twice)) == (
        "ratings.csv: column 'rating' appears more than once (header: userId,movieId,rating,timestamp,rating)")
    unused_twice = "".join([lines[0].replace("\n", ",note,note\n")] + [line.replace("\n", ",a,b\n") for line in lines[1:]])
    assert load_dataset(dataset(tmp_path, ratings=unused_twice)).interactions.values.tolist() == [2.5, 5.0, 4.0]  # unread


def test_a_tags_file_that_is_there_but_unreadable_is_an_error_not_no_tags(tmp_path):
    (dataset(tmp_path, tags=None) / "tags.csv").mkdir()
    assert error(tmp_path) == "tags.csv: cannot read: Is a directory"
    (tmp_path / "tags.csv").rmdir()
    (tmp_path / "tags.csv").symlink_to(tmp_path / "gone.csv")
    assert error(tmp_path) == f"tags.csv: not found in {tmp_path}"


def test_empty_files(tmp_path):
    assert error(dataset(tmp_path, ratings="")) == "ratings.csv: empty file"
    assert error(dataset(tmp_path, ratings=RATINGS.splitlines(keepends=True)[0])) == "ratings.csv: no rows after the header"
    assert error(dataset(tmp_path, ratings=RATINGS, tags="")) == "tags.csv: empty file"
    assert len(load_dataset(dataset(tmp_path, tags=TAGS.splitlines(keepends=True)[0])).texts.users) == 0  # tags are optional


def test_missing_files_and_directories(tmp_path):
    assert error(dataset(tmp_path, ratings=None)) == f"ratings.csv: not found in {tmp_path}"
    assert error(tmp_path / "nope") == (f"{tmp_path / 'nope'}: not a directory; MovieLens releases are at "
                                        "https://grouplens.org/datasets/movielens/ (ml-latest-small.zip, unzipped)")


def test_csv_module_errors_name_the_line(tmp_path):
    huge = RATINGS + '3,1,4.0,"' + "1" * 200_000 + '"\n'
    assert error(dataset(tmp_path, ratings=huge)) == "ratings.csv line 5: field larger than field limit (131072)"


def test_the_movielens_dataset_loads_unchanged():
    if not (MOVIELENS / "ratings.csv").is_file():
        pytest.skip(MOVIELENS_MISSING)
    ds = load_dataset(MOVIELENS)
    assert (len(ds.items), len(ds.interactions), len(ds.texts.users)) == (9742, 100836, 3683)
    assert ds.items[0].text == "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy"
    assert ds.interactions.values.min() == 0.5 and ds.interactions.values.max() == 5.0


def test_ids_the_server_would_refuse_name_their_line(tmp_path):
    """load-movielens sent them and stopped at the server's INVALID_ARGUMENT,
    some batches stored, naming only events[399].user_id (an audit)."""
    assert error(dataset(tmp_path, ratings=RATINGS + '"",1,4.0,964982703\n')) == \
        "ratings.csv line 5: userId '' must not be empty"
    assert error(dataset(tmp_path, ratings=RATINGS, tags=TAGS + '"a\tb",1,x,1\n')) == \
        "tags.csv line 3: userId 'a\\tb' must not contain control characters (U+0000 to U+001F, U+007F)"
    long_id = "u" * 257
    assert error(dataset(tmp_path, ratings=RATINGS + f"{long_id},1,4.0,964982703\n")) == \
        f"ratings.csv line 5: userId '{long_id}' is 257 bytes long; at most 256"
    assert error(dataset(tmp_path, movies=MOVIES + ",Nameless (2001),Drama\n")) == \
        "movies.csv line 4: movieId '' must not be empty"


def test_categories_the_server_would_refuse_name_their_line(tmp_path):
    """UpsertItems refuses them, which stopped load-movielens after earlier batches were stored."""
    from halflife.texts import MAX_CATEGORIES, MAX_CATEGORY_BYTES

    long_genre = "g" * (MAX_CATEGORY_BYTES + 1)
    assert error(dataset(tmp_path, movies=MOVIES + f"3,Long (2001),Drama|{long_genre}\n")) == \
        f"movies.csv line 4: genres 'Drama|{long_genre}' has the category '{long_genre}', which is " \
        f"{MAX_CATEGORY_BYTES + 1} bytes long; at most {MAX_CATEGORY_BYTES}"
    assert error(dataset(tmp_path, movies=MOVIES + "3,Gap (2001),Drama||Crime\n")) == \
        "movies.csv line 4: genres 'Drama||Crime' has the category '', which must not be empty"
    many = "|".join(f"g{n}" for n in range(MAX_CATEGORIES + 1))
    assert error(dataset(tmp_path, movies=MOVIES + f"3,Many (2001),{many}\n")) == \
        f"movies.csv line 4: genres '{many}' holds {MAX_CATEGORIES + 1} categories; at most {MAX_CATEGORIES}"
    at_the_limits = "|".join(f"g{n}" for n in range(MAX_CATEGORIES - 1)) + "|" + "g" * MAX_CATEGORY_BYTES
    assert len(load_dataset(dataset(tmp_path, movies=MOVIES + f"3,Full (2001),{at_the_limits}\n")).items[2].categories) \
        == MAX_CATEGORIES


def test_a_repeated_item_id_names_both_lines(tmp_path):
    """The second row replaced the first unsaid (an audit)."""
    assert error(dataset(tmp_path, movies=MOVIES + "1,Totally Different Movie (2001),Drama\n")) == \
        "movies.csv line 4: movieId '1' repeats line 2"


def test_times_outside_the_asked_window_name_their_line(tmp_path):
    directory = dataset(tmp_path)
    with pytest.raises(DatasetError) as caught:
        load_dataset(directory, earliest=0.0, latest=964_982_000.0)
    assert str(caught.value) == ("ratings.csv line 2: timestamp '964982703' is not a time from "
                                 "1970-01-01T00:00:00Z to 2000-07-30T18:33:20Z")
    assert len(load_dataset(directory, earliest=0.0, latest=2e9).interactions) == 3


def test_one_long_text_does_not_size_every_row(tmp_path):
    """A fixed-width str array sizes every row by the longest: one 30,000
    character tag among 60,000 short ones asked for 6.7 GiB (a review)."""
    import tracemalloc

    tags = "userId,movieId,tag,timestamp\n" + "".join(f"{n % 2 + 1},1,tag {n},1445714994\n" for n in range(2000))
    tags += "1,2," + "word " * 6000 + ",1445714995\n"
    tracemalloc.start()
    ds = load_dataset(dataset(tmp_path, tags=tags))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(ds.texts.texts) == 2001
    assert peak < 20 * 2**20, peak  # fixed width: 2,001 x 30,000 x 4 bytes, 240 MB (twice, sorted by time)
