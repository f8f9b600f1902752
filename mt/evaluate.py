"""Scores as the field reports them: sacreBLEU BLEU and chrF with their signatures (Post, 2018).

Test sets by name (`wmt14`, `en-de`) come through sacreBLEU's own dataset code: it downloads them into its
cache (`$SACREBLEU`, default ~/.sacrebleu) when online and reads the cached text files otherwise, so an
offline machine with a filled cache takes exactly the path an online one does.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF

from mt.errors import MTError
from mt.io import read_lines

log = logging.getLogger(__name__)


@dataclass
class Scores:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    bleu_verbose: str  # sacreBLEU's own score line: "BLEU = 34.50 65.1/41.0/27.6/18.6 (BP = ...)"

    def format(self) -> list[str]:
        """The lines `mt eval` prints: each score in sacreBLEU's own format, then its signature."""
        return [self.bleu_verbose, self.bleu_signature, f"chrF2 = {self.chrf:.2f}", self.chrf_signature]


def score(hyps: list[str], refs: list[str] | list[list[str]]) -> Scores:
    """Corpus BLEU (13a tokenisation, exponential smoothing) and chrF2 of `hyps` against one or more
    reference streams (`refs` as one list of lines, or a list of such lists)."""
    streams = [refs] if refs and isinstance(refs[0], str) else list(refs)
    for stream in streams:
        if len(stream) != len(hyps):
            raise MTError(f"{len(hyps)} hypotheses but {len(stream)} references: the counts must match")
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hyps, streams), chrf.corpus_score(hyps, streams)
    return Scores(b.score, c.score, str(bleu.get_signature()), str(chrf.get_signature()), b.format())


def read_hyp_ref(hyp_path: str | Path, ref_paths: list[str | Path] | str | Path) -> tuple[list[str], list[list[str]]]:
    """Read a hypothesis file and its reference file(s); each must be non-empty and of the same length."""
    if isinstance(ref_paths, (str, Path)):
        ref_paths = [ref_paths]
    hyps = list(read_lines(hyp_path))
    if not hyps:
        raise MTError(f"{hyp_path}: the file is empty")
    refs = []
    for path in ref_paths:
        lines = list(read_lines(path))
        if len(lines) != len(hyps):
            raise MTError(f"{path}: has {len(lines)} lines but {hyp_path} has {len(hyps)}: "
                          "hypotheses and references must match line for line")
        refs.append(lines)
    return hyps, refs


def load_test_set(name: str, langpair: str) -> tuple[list[str], list[list[str]]]:
    """Source lines and reference streams of a sacreBLEU test set, e.g. ('wmt14', 'en-de')."""
    from sacrebleu.dataset import DATASETS
    from sacrebleu.utils import SACREBLEU_DIR

    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise MTError(f"-t {name}: not a sacreBLEU test set{hint}")
    dataset = DATASETS[name]
    if langpair not in dataset.langpairs:
        pairs = sorted(p for p in dataset.langpairs if "-" in p)
        raise MTError(f"-l {langpair}: {name} has no such language pair (has {', '.join(pairs)})")
    try:
        source = dataset.get_source_file(langpair)
        references = dataset.get_reference_files(langpair)
    except Exception as e:  # sacreBLEU raises plain exceptions (and exits) on download failures
        raise MTError(f"-t {name} -l {langpair}: could not get the test set into {SACREBLEU_DIR} "
                      f"({type(e).__name__}: {e}); it needs the internet once") from None
    except SystemExit:
        raise MTError(f"-t {name} -l {langpair}: sacreBLEU could not download the test set into "
                      f"{SACREBLEU_DIR}; it needs the internet once") from None
    return list(read_lines(source)), [list(read_lines(r)) for r in references]
