"""Scores as the field reports them: sacreBLEU BLEU and chrF with their signatures (Post, 2018).

Test sets by name (`wmt14`, `en-de`) come through sacreBLEU's own dataset code: it downloads them into its
cache (`$SACREBLEU`, default ~/.sacrebleu) when online and reads the cached text files otherwise, so an
offline machine with a filled cache takes exactly the path an online one does. sacreBLEU reads `$SACREBLEU`
once, when it is first imported.
"""

from __future__ import annotations

import difflib
import logging
import re
import tarfile
import zipfile
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
    bleu_signature: str  # sacreBLEU's signature: "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
    chrf_signature: str
    # sacreBLEU's own score strings, "BLEU = 34.50 65.1/41.0/27.6/18.6 (BP = 1.000 ...)" and "chrF2 = 58.12"
    bleu_verbose: str = ""
    chrf_verbose: str = ""

    def format(self) -> list[str]:
        """The lines `mt eval` prints: each score as sacreBLEU writes it, then its signature as
        `sacrebleu -f text` prefixes it ("BLEU|nrefs:1|..."), the form papers quote."""
        return [self.bleu_verbose or f"BLEU = {self.bleu:.2f}", f"BLEU|{self.bleu_signature}",
                self.chrf_verbose or f"chrF2 = {self.chrf:.2f}", f"chrF2|{self.chrf_signature}"]


def reference_streams(refs: list[str] | list[list[str]]) -> list[list[str]]:
    """One reference stream (a list of lines) or several, as a list of streams."""
    if not refs:
        raise MTError("no references to score against")
    return [refs] if isinstance(refs[0], str) else [list(stream) for stream in refs]


def score(hyps: list[str], refs: list[str] | list[list[str]], trg_lang: str = "") -> Scores:
    """Corpus BLEU (13a tokenisation, exponential smoothing) and chrF2 of `hyps` against one reference stream
    (`refs` as a list of lines) or several (a list of such lists, line i of each for hypothesis i).

    `trg_lang` (e.g. "zh", "ja") picks sacreBLEU's language-specific BLEU tokenizer as `sacrebleu -l xx-zh`
    does; empty keeps 13a.
    """
    streams = reference_streams(refs)
    if not hyps:
        raise MTError("no hypotheses to score")
    for number, stream in enumerate(streams, start=1):
        if len(stream) != len(hyps):
            raise MTError(f"{len(hyps)} hypotheses but {len(stream)} lines in reference stream {number} of "
                          f"{len(streams)}: the counts must match")
    bleu, chrf = BLEU(trg_lang=trg_lang), CHRF()
    bleu_score, chrf_score = bleu.corpus_score(hyps, streams), chrf.corpus_score(hyps, streams)
    return Scores(bleu_score.score, chrf_score.score, str(bleu.get_signature()), str(chrf.get_signature()),
                  bleu_score.format(), chrf_score.format())


def record_scores(checkpoints: list[Path], test: str, scores: Scores, decode) -> None:
    """Append the scores of `checkpoints` (one, or an ensemble's) on `test` to scores.jsonl beside the first
    (its run directory), where model cards (`mt export`) find them; a directory mt cannot write to is only a
    warning."""
    from mt.metrics import append_record  # (imports torch, which scoring a file does not need)

    search = ("greedy" if decode.method == "greedy" else
              f"beam {decode.beam_size}, length penalty {decode.length_penalty}" if decode.method == "beam" else
              decode.method)
    checkpoint = checkpoints[0]
    name = checkpoint.name if len(checkpoints) == 1 else " + ".join(str(c) for c in checkpoints)
    record = {"checkpoint": name, "test": test, "search": search, "precision": decode.precision,
              "bleu": scores.bleu, "chrf": scores.chrf, "bleu_signature": scores.bleu_signature,
              "chrf_signature": scores.chrf_signature}
    try:
        append_record(checkpoint.parent / "scores.jsonl", record)
    except OSError as e:
        log.warning("%s: scores not recorded (%s)", checkpoint.parent / "scores.jsonl", e.strerror or e)


def read_hyp_ref(hyp_path: str | Path, ref_paths: list[str | Path] | str | Path
                 ) -> tuple[list[str], list[list[str]]]:
    """Read a hypothesis file and one or more reference files, each non-empty and as long as the
    hypotheses. Returns (hypotheses, reference streams)."""
    if isinstance(ref_paths, (str, Path)):
        ref_paths = [ref_paths]
    if not ref_paths:
        raise MTError(f"{hyp_path}: no reference files given to score it against")
    hyps = list(read_lines(hyp_path))
    if not hyps:
        raise MTError(f"{hyp_path}: the file is empty")
    refs = []
    for path in ref_paths:
        lines = list(read_lines(path))
        if not lines:
            raise MTError(f"{path}: the file is empty")
        if len(lines) != len(hyps):
            raise MTError(f"{path}: has {len(lines)} lines but {hyp_path} has {len(hyps)}: "
                          "hypotheses and references must match line for line")
        refs.append(lines)
    return hyps, refs


def _choices(kind: str, wrong: str, valid: list[str]) -> str:
    # Matched lower-cased and with years shortened, so that "WMT2014" suggests "wmt14".
    key = re.sub(r"20(\d\d)", r"\1", wrong.strip().lower())
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{kind} '{wrong}' is unknown{hint} (valid: {', '.join(valid)})"


def load_test_set(name: str, langpair: str) -> tuple[list[str], list[list[str]]]:
    """Source lines and reference streams of a sacreBLEU test set, e.g. ('wmt14', 'en-de').

    sacreBLEU downloads the set into its cache on first use; with the cache filled nothing touches the
    network. Some sets (wmt20 en-de, say) have several references, hence a list of streams.
    """
    import sacrebleu.utils as sacrebleu_utils
    from sacrebleu.dataset import DATASETS

    if name not in DATASETS:
        raise MTError(f"test set {name}: " + _choices("sacreBLEU test set", name, sorted(DATASETS)))
    pairs = sorted(sacrebleu_utils.get_langpairs_for_testset(name))
    if langpair not in pairs:
        raise MTError(f"test set {name}: " + _choices("language pair", langpair, pairs))
    cache = sacrebleu_utils.SACREBLEU_DIR
    try:
        source = sacrebleu_utils.get_source_file(name, langpair)
        references = sacrebleu_utils.get_reference_files(name, langpair)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as e:  # URLError is an OSError
        raise MTError(f"test set {name} {langpair}: the download into sacreBLEU's cache {cache} failed "
                      f"({type(e).__name__}: {e}); offline, copy a filled cache there or point $SACREBLEU at "
                      f"one; a half-written {Path(cache) / name} can be deleted and fetched again") from None
    except SystemExit:  # sacreBLEU logs the reason (SSL error, MD5 mismatch) and calls sys.exit
        raise MTError(f"test set {name} {langpair}: the download into sacreBLEU's cache {cache} failed "
                      "(sacreBLEU's log above says why); offline, copy a filled cache there or point "
                      "$SACREBLEU at one") from None
    sources = list(read_lines(source))
    refs = [list(read_lines(path)) for path in references]
    for path, stream in zip(references, refs):
        if len(stream) != len(sources):
            raise MTError(f"{path}: has {len(stream)} lines but {source} has {len(sources)}: the cached test "
                          f"set is damaged; delete {Path(cache) / name} to fetch it again")
    log.info("test set %s %s: %d segments, %d reference(s), from %s", name, langpair, len(sources), len(refs),
             source)
    return sources, refs
