"""Captions and families from file names: Universal Category System names, folder and file words, take variants.

Pure string functions (no file access), shared by the conversion workers (captions) and the split (families).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Tokens that say how a file was made or copied, not what it sounds like.
STOP_WORDS = frozenset(
    'copy take tk alt final edit edited mono stereo wav wave flac mp3 ogg aif aiff new untitled audio track '
    'sound sounds sfx fx sample samples file clip clips rec recording recordings version ver mix master raw'.split()
)
# UCS CatID: an upper-case category then a capitalised subcategory (DOORWood, AMBForst), optionally "-UserCategory".
_CATID = re.compile(r'^([A-Z]+)([A-Z][a-z]+)(?:-[A-Za-z0-9]+)?$')
_SEPARATORS = re.compile(r'[\s_\-.,;:+&()\[\]{}\'"!?#@=~]+')
_CAMEL = re.compile(r'[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[^\W\d_]+')
# A take or copy marker at the end of a stem: "_03", " 2b", " (1)", " copy", " - Copy 2", "_take3", "tk02", "_v2".
_TAKE_SUFFIX = re.compile(r'[\s_\-.]*(?:\(\d+\)|copy(?:\s*\d+)?|take\s*\d+|tk\s*\d+|v\d+|\d+[a-z]?)$', re.IGNORECASE)
_VOWELS = frozenset('aeiouy')


@dataclass(frozen=True)
class UcsName:
    """The parts of a Universal Category System file name ``CatID_FXName_CreatorID_SourceID[_UserData]``."""

    cat_id: str
    category: str
    subcategory: str
    fx_name: str


def _is_word(token: str) -> bool:
    """A token that can describe a sound: letters only, two or more, with a vowel if it is ASCII (not "JD", "SFX")."""
    if len(token) < 2 or not token.isalpha() or token in STOP_WORDS:
        return False
    return not token.isascii() or bool(_VOWELS & set(token))


def words(text: str) -> list[str]:
    """The lower-case words of a name: split on separators and camelCase; codes with digits are dropped whole.

    ``"Dog_Bark_Small_03"`` gives ``["dog", "bark", "small"]``; ``"ZOOM0001"`` and ``"a8f3e2c1"`` give nothing.
    """
    out: list[str] = []
    for token in _SEPARATORS.split(text):
        if not token or any(c.isdigit() for c in token):
            continue  # take numbers, recorder and vendor codes, hashes
        out += [w.lower() for w in _CAMEL.findall(token) if _is_word(w.lower())]
    return out


def _split_rel(name_rel: str) -> tuple[list[str], str]:
    """Folders and the stem (without extension) of a relative path."""
    parts = name_rel.split('/')
    stem = parts[-1].rsplit('.', 1)[0] if '.' in parts[-1] else parts[-1]
    return parts[:-1], stem


def parse_ucs(stem: str) -> UcsName | None:
    """The UCS parts of a file stem, or ``None`` if it does not have the UCS shape (a CatID and three fields)."""
    parts = stem.split('_')
    if len(parts) < 3 or not parts[1].strip() or not parts[2].strip():
        return None
    match = _CATID.match(parts[0])
    if match is None:
        return None
    return UcsName(parts[0], match.group(1), match.group(2), parts[1])


def _join(main: list[str], extra: list[str]) -> str | None:
    """``"main words, extra words"`` with the extra words already in main (or their singular) left out."""
    if not main:
        return None
    seen = {w for m in main for w in (m, m.rstrip('s'))}
    rest = [w for w in dict.fromkeys(extra) if w not in seen and w.rstrip('s') not in seen]
    return ' '.join(main) + (', ' + ' '.join(rest) if rest else '')


def ucs_caption(name_rel: str) -> str | None:
    """Caption of a UCS-named file: its FXName's words, then the CatID's subcategory and category words.

    ``DOORWood_Door Slam Heavy_JD_Farm.wav`` gives ``"door slam heavy, wood"``; ``None`` if the name is not UCS.
    """
    ucs = parse_ucs(_split_rel(name_rel)[1])
    if ucs is None:
        return None
    return _join(words(ucs.fx_name), words(ucs.subcategory) + words(ucs.category))


def names_caption(name_rel: str) -> str | None:
    """Caption from the file name's words, then its folders' words (nearest first); ``None`` if the file name has none.

    ``Animals/Dogs/Dog_Bark_Small_03.wav`` gives ``"dog bark small, animals"``; ``0001.wav`` gives ``None``.
    """
    folders, stem = _split_rel(name_rel)
    return _join(words(stem), [w for folder in reversed(folders) for w in words(folder)])


def family_key(name_rel: str) -> str:
    """The folder and stem with take and copy markers removed: takes ``_01`` … ``_05`` of one sound share it."""
    folders, stem = _split_rel(name_rel)
    base = stem
    for _ in range(3):  # "Door_03 copy (1)": a copy marker after a take number, at most
        shorter = _TAKE_SUFFIX.sub('', base)
        if shorter == base or not shorter:
            break
        base = shorter
    return '/'.join(folders + [base.lower()])


def stratum_of(name_rel: str) -> str:
    """The kind of sound a file belongs to for the split: its UCS CatID, else its folder ("" at the top)."""
    folders, stem = _split_rel(name_rel)
    ucs = parse_ucs(stem)
    return f'ucs:{ucs.cat_id.split("-")[0]}' if ucs else '/'.join(folders)
