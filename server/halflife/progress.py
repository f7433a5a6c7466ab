"""Progress bars for the long commands (load-movielens, eval), on a terminal
only: in a redirected stderr (a file, a CI log) tqdm's redraws are noise,
carriage returns and, for nested bars, cursor-movement escape codes."""

from functools import partial

from tqdm import tqdm

progress = partial(tqdm, disable=None)  # tqdm: None turns the bar off where the stream is no terminal
