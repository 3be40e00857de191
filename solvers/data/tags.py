"""Text tags embedded in audio files: RIFF INFO, Broadcast WAV ``bext`` and ``iXML`` chunks, ID3, Vorbis comments.

:func:`read_tags` works on the bytes a conversion worker already holds, so tags cost no extra read. WAV chunks are
walked here (mutagen reads a WAV's ID3 chunk but neither its INFO list nor ``bext``/``iXML``); every other format
goes through mutagen (FLAC, Ogg Vorbis/Opus: Vorbis comments; MP3, AIFF: ID3).
"""

from __future__ import annotations

import html
import io
import re
import struct
from collections.abc import Iterator
from typing import Any

# The fields kept, in the order a caption is taken from them (captions.tags_caption).
TAG_FIELDS = ('description', 'title', 'comment', 'subject', 'keywords')
MAX_TAG_CHARS = 2000  # a caption needs a sentence or two; longer tag text is cut so the state stays small
_INFO_FIELDS = {b'INAM': 'title', b'ISBJ': 'subject', b'ICMT': 'comment', b'IKEY': 'keywords'}
_VORBIS_FIELDS = {'description': 'description', 'title': 'title', 'comment': 'comment', 'subject': 'subject'}
_IXML_FIELDS = (('BWF_DESCRIPTION', 'description'), ('DESCRIPTION', 'description'), ('NOTE', 'comment'))
# Recorders (Sound Devices, Zoom) fill bext Description with "sSPEED=...", "zTRK1=..." lines: not descriptions.
_KEY_VALUE_LINE = re.compile(r'^\s*[A-Za-z][\w.]*=')


def _text(raw: bytes) -> str:
    """Bytes of a tag as text: up to the first NUL, UTF-8 if it decodes, else Latin-1 (what old WAV tools write)."""
    raw = raw.split(b'\0', 1)[0]
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError:
        text = raw.decode('latin-1')
    return ' '.join(text.split())[:MAX_TAG_CHARS]


def _riff_chunks(data: memoryview, start: int, end: int) -> Iterator[tuple[bytes, memoryview]]:
    """The ``(id, body)`` chunks of a RIFF container between ``start`` and ``end`` (bodies are views: no copies)."""
    pos = start
    while pos + 8 <= end:
        cid = bytes(data[pos : pos + 4])
        (size,) = struct.unpack_from('<I', data, pos + 4)
        yield cid, data[pos + 8 : min(pos + 8 + size, end)]
        pos += 8 + size + (size & 1)  # chunks are padded to an even size


def _bext_description(body: memoryview) -> str:
    """The 256-byte Description field of a ``bext`` chunk, without recorder ``key=value`` lines."""
    raw = bytes(body[:256]).split(b'\0', 1)[0]
    lines = [line for line in re.split(rb'[\r\n]+', raw) if not _KEY_VALUE_LINE.match(line.decode('latin-1'))]
    return _text(b' '.join(lines))


def _ixml_fields(body: memoryview) -> dict[str, str]:
    """Description and note of an ``iXML`` chunk (read by pattern: no XML parser runs on a user's file)."""
    text = bytes(body).decode('utf-8', errors='replace')
    found: dict[str, str] = {}
    for element, field in _IXML_FIELDS:
        match = re.search(rf'<{element}>(.*?)</{element}>', text, re.DOTALL)
        if match and field not in found:
            value = _text(html.unescape(match.group(1)).encode('utf-8'))
            if value:
                found[field] = value
    return found


def _wav_tags(data: bytes) -> dict[str, str]:
    """Tags of a RIFF/WAVE file: ``bext`` Description, iXML, then the INFO list, then an ``id3 `` chunk."""
    view = memoryview(data)
    tags: dict[str, str] = {}
    for cid, body in _riff_chunks(view, 12, len(data)):
        if cid == b'bext':
            tags.setdefault('description', _bext_description(body))
        elif cid == b'iXML':
            for field, value in _ixml_fields(body).items():
                tags.setdefault(field, value)
        elif cid == b'LIST' and bytes(body[:4]) == b'INFO':
            for sub, sub_body in _riff_chunks(body, 4, len(body)):
                if sub in _INFO_FIELDS:
                    tags.setdefault(_INFO_FIELDS[sub], _text(bytes(sub_body)))
        elif cid in (b'id3 ', b'ID3 '):
            for field, value in _id3_chunk_tags(bytes(body)).items():
                tags.setdefault(field, value)
    return {k: v for k, v in tags.items() if v}


def _id3_chunk_tags(body: bytes) -> dict[str, str]:
    from mutagen.id3 import ID3, ID3NoHeaderError

    try:
        return _id3_fields(ID3(io.BytesIO(body)))
    except (ID3NoHeaderError, ValueError, EOFError):
        return {}


def _id3_fields(id3: Any) -> dict[str, str]:
    """Title (TIT2), description (TIT3 or a TXXX "description") and comment (COMM) of ID3 tags."""
    fields: dict[str, str] = {}
    for frame in id3.getall('TXXX'):
        if str(frame.desc).lower() == 'description' and frame.text:
            fields['description'] = _text(str(frame.text[0]).encode('utf-8'))
    for frame_id, field in (('TIT3', 'description'), ('TIT2', 'title')):
        frame = id3.get(frame_id)
        if frame is not None and frame.text and field not in fields:
            fields[field] = _text(str(frame.text[0]).encode('utf-8'))
    for frame in id3.getall('COMM'):
        if frame.text and not str(frame.desc).startswith('iTun'):  # iTunes' normalisation data, not text
            fields.setdefault('comment', _text(str(frame.text[0]).encode('utf-8')))
            break
    return {k: v for k, v in fields.items() if v}


def _mutagen_tags(data: bytes) -> dict[str, str]:
    """Tags of a non-WAV file through mutagen: Vorbis comments (FLAC, Ogg) or ID3 (MP3, AIFF)."""
    import mutagen
    from mutagen.id3 import ID3

    try:
        tags = mutagen.File(io.BytesIO(data)).tags  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - a tag parser failing on a damaged file leaves it untagged; libsndfile judges the audio
        return {}
    if tags is None:
        return {}
    if isinstance(tags, ID3):
        return _id3_fields(tags)
    if not hasattr(tags, 'as_dict'):
        return {}
    found = {}
    for key, values in tags.as_dict().items():
        field = _VORBIS_FIELDS.get(str(key).lower())
        if field and values and field not in found:
            found[field] = _text(str(values[0]).encode('utf-8'))
    return {k: v for k, v in found.items() if v}


def read_tags(data: bytes) -> dict[str, str]:
    """The text tags of an audio file's bytes, ``{field: text}`` for the fields of :data:`TAG_FIELDS` present.

    Args:
        data: The whole file, as the conversion worker read it.

    Returns:
        An empty dict for a file without tags, or one whose tags cannot be parsed.
    """
    if len(data) >= 12 and data[:4] == b'RIFF' and data[8:12] == b'WAVE':
        return _wav_tags(data)
    return _mutagen_tags(data)
