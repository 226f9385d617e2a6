"""WordNet for METEOR: find nltk's WordNet, or build it from Debian's WordNet 3.0 packages.

nltk's METEOR matches synonyms through WordNet, which nltk downloads from the network. Offline,
:func:`ensure_wordnet` builds nltk's copy from Debian's ``wordnet-base`` and ``wordnet-sense-index``
instead; :func:`require_wordnet` does so on first use when nltk finds none.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nltk
from nltk.corpus import wordnet as nltk_wordnet

from ecglm.io import staged

DEBIAN_WORDNET = Path("/usr/share/wordnet")
WORDNET_APT_COMMAND = "apt-get install wordnet-base wordnet-sense-index"

# WordNet 3.0's 45 lexicographer files (number, name, syntactic category: noun 1, verb 2, adjective 3,
# adverb 4), from the table in the lexnames(5WN) man page of Debian's wordnet-base (WordNet 3.0, Dec 2006).
# Debian does not ship the `lexnames` file that nltk's WordNet reader opens; it is this table, tab-separated.
_LEXNAMES = """
00 adj.all 3
01 adj.pert 3
02 adv.all 4
03 noun.Tops 1
04 noun.act 1
05 noun.animal 1
06 noun.artifact 1
07 noun.attribute 1
08 noun.body 1
09 noun.cognition 1
10 noun.communication 1
11 noun.event 1
12 noun.feeling 1
13 noun.food 1
14 noun.group 1
15 noun.location 1
16 noun.motive 1
17 noun.object 1
18 noun.person 1
19 noun.phenomenon 1
20 noun.plant 1
21 noun.possession 1
22 noun.process 1
23 noun.quantity 1
24 noun.relation 1
25 noun.shape 1
26 noun.state 1
27 noun.substance 1
28 noun.time 1
29 verb.body 2
30 verb.change 2
31 verb.cognition 2
32 verb.communication 2
33 verb.competition 2
34 verb.consumption 2
35 verb.contact 2
36 verb.creation 2
37 verb.emotion 2
38 verb.motion 2
39 verb.perception 2
40 verb.possession 2
41 verb.social 2
42 verb.stative 2
43 verb.weather 2
44 adj.ppl 3
"""


def _default_nltk_data() -> Path:
    return Path(os.environ.get("ECGLM_NLTK_DATA") or "~/.cache/ecglm/nltk_data")


def ensure_wordnet(nltk_data: str | Path | None = None) -> Path:
    """Build ``<nltk_data>/corpora/wordnet`` from Debian's WordNet 3.0 and put it on ``nltk.data.path``.

    Copies (nltk rejects links that leave its root) the files of ``/usr/share/wordnet`` (Debian's
    ``wordnet-base`` and ``wordnet-sense-index``) and writes the ``lexnames`` file they lack. Idempotent.
    Default location: ``$ECGLM_NLTK_DATA`` or ``~/.cache/ecglm/nltk_data``. Returns the nltk data root.
    """
    root = (Path(nltk_data) if nltk_data is not None else _default_nltk_data()).expanduser()
    if not (DEBIAN_WORDNET / "data.noun").is_file():
        raise RuntimeError(
            f"WordNet not found at {DEBIAN_WORDNET}; METEOR needs it: {WORDNET_APT_COMMAND} "
            "(as root, or with sudo)"
        )
    corpus = root / "corpora" / "wordnet"
    corpus.mkdir(parents=True, exist_ok=True)
    # Staged per process: ranks building the same folder never see half a file, nor write into each other's.
    for source in sorted(DEBIAN_WORDNET.iterdir()):
        dest = corpus / source.name
        if source.is_file() and not (dest.is_file() and dest.stat().st_size == source.stat().st_size):
            with staged(dest, unique=True) as partial:
                shutil.copyfile(source, partial)
    lexnames = "".join("\t".join(row.split()) + "\n" for row in _LEXNAMES.strip().splitlines())
    if not (corpus / "lexnames").is_file() or (corpus / "lexnames").read_text() != lexnames:
        with staged(corpus / "lexnames", unique=True) as partial:
            partial.write_text(lexnames)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    return root


def require_wordnet() -> None:
    """Load nltk's WordNet, building it with :func:`ensure_wordnet` if nltk cannot find one."""
    try:
        nltk_wordnet.ensure_loaded()
    except LookupError:
        if not (DEBIAN_WORDNET / "data.noun").is_file():
            raise RuntimeError(
                f"METEOR needs WordNet, which nltk cannot find. Install it with `{WORDNET_APT_COMMAND}` "
                "(ecglm.metrics.ensure_wordnet() then builds nltk's copy), or nltk.download('wordnet')"
            ) from None
        ensure_wordnet()
        nltk_wordnet.ensure_loaded()
