"""The evaluation report folder's documents: spectrogram PNGs (numpy + Pillow), report.json, summary.md, index.html.

``index.html`` is a self-contained listening page (no script, no external resource): the metric table on top, then
one row per prompt and one column per model (plus the real clip of that caption when a dataset was given), each
cell holding every seed's spectrogram, audio player and CLAP score.
"""

from __future__ import annotations

import html
import json
import typing as tp
import urllib.parse
from pathlib import Path

import numpy as np
import torch

from solvers import atomic
from solvers.evaluation.metrics import HIGHER_IS_BETTER
from solvers.project import counted

# The table's columns, in order, with their headers; a column shows only when some model has the score.
COLUMNS = {
    'clap': 'CLAP',
    'kad': 'KAD',
    'fad': 'FAD',
    'kld': 'PaSST KL',
    'codec_pesq': 'codec PESQ',
    'codec_stoi': 'codec STOI',
    'codec_sisdr': 'codec SI-SDR dB',
    'codec_mel': 'codec mel dist.',
}
FAD_MIN_CLIPS = 100  # below this many clips on either side, FAD's bias dominates differences between models
# A magma-like colour ramp: silence is near-black, the loudest bins pale yellow.
_RAMP = np.array(
    [(0, 0, 4), (59, 15, 112), (140, 41, 129), (222, 73, 104), (254, 159, 109), (252, 253, 191)], dtype=np.float64
)


# ---------------------------------------------------------------------------------------------------- spectrograms
def spectrogram_image(
    wav: torch.Tensor | np.ndarray,
    sample_rate: int,
    width: int = 320,
    height: int = 120,
    n_fft: int = 512,
    top_db: float = 80.0,
) -> tp.Any:
    """A log-magnitude STFT of a [C, T] or [T] clip as a PIL RGB image, low frequencies at the bottom.

    Args:
        wav: the clip (channels are averaged).
        sample_rate: its rate (only the hop depends on it: 8 ms).
        width, height: image size in pixels.
        n_fft: FFT size.
        top_db: dynamic range shown below the clip's loudest bin.
    """
    from PIL import Image

    x = np.asarray(wav.detach().float().cpu() if isinstance(wav, torch.Tensor) else wav, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1]).mean(0)
    hop = max(1, int(0.008 * sample_rate))
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    db = 20 * np.log10(np.abs(np.fft.rfft(frames, axis=-1)).T + 1e-10)
    # Relative to the loudest bin, but never above 0 dB (a full-scale tone's bins reach ~+40): silence stays dark.
    level = np.clip((db - max(db.max(), 0.0) + top_db) / top_db, 0, 1)[::-1]
    index = level * (len(_RAMP) - 1)
    low = np.floor(index).astype(int).clip(0, len(_RAMP) - 2)
    frac = (index - low)[..., None]
    rgb = (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).round().astype(np.uint8)
    return Image.fromarray(rgb, 'RGB').resize((width, height), Image.Resampling.BILINEAR)


def spectrogram_png(wav: torch.Tensor, sample_rate: int, path: Path, root: Path) -> str:
    """Write a clip's spectrogram to ``path``; return its path relative to ``root`` (for report.json and links)."""
    import io

    buffer = io.BytesIO()
    spectrogram_image(wav, sample_rate).save(buffer, format='PNG')
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, buffer.getvalue())
    return str(path.relative_to(root))


# ---------------------------------------------------------------------------------------------------- tables
def _columns(report: dict) -> list[str]:
    present = {k for model in report['models'] for k in model['metrics']}
    return [key for key in COLUMNS if key in present]


def _best(report: dict, key: str) -> float | None:
    values = [m['metrics'][key] for m in report['models'] if key in m['metrics']]
    if len(set(values)) < 2:  # one model, or a tie of all (e.g. the codec scores of models sharing a codec)
        return None
    return max(values) if HIGHER_IS_BETTER[key] else min(values)


def _fmt(value: tp.Any) -> str:
    return '—' if value is None else f'{value:.3f}'


def _arrow(key: str) -> str:
    return '↑' if HIGHER_IS_BETTER[key] else '↓'


def notes(report: dict) -> list[str]:
    """Plain-language caveats for the numbers: skipped scores, small sets, the meaning of the real-clip row."""
    out = [f'{key}: {reason}' for key, reason in sorted(report['skipped'].items())]
    real = report['real']['metrics']
    n_real = real.get('n_real', 0)
    n_gen = len(report['prompts']) * len(report['seeds'])
    if any('fad' in m['metrics'] for m in report['models']) and min(n_real, n_gen) < FAD_MIN_CLIPS:
        out.append(
            f'FAD from {n_gen} generated and {n_real} real clips is dominated by its small-sample bias: '
            'compare it only between models scored on the same clips, and prefer KAD.'
        )
    if 'clap_real' in real:
        out.append(
            f'The real clips score CLAP {real["clap_real"]:.3f} with their own captions: the level a model '
            'that sounds like your data reaches with this CLAP.'
        )
    if any('codec_pesq' in m['metrics'] for m in report['models']):
        out.append(
            "codec scores compare real clips with the codec's reconstruction of them: the ceiling of any "
            'fine-tune (PESQ and STOI model speech; on other sounds read them as rough guides).'
        )
    return out


def markdown(report: dict) -> str:
    """summary.md: the metric table, the per-prompt CLAP table, caveats, and where the clips are."""
    cols = _columns(report)
    lines = [
        '# Evaluation report',
        '',
        f'{report["created"]} · {counted(len(report["prompts"]), "prompt")} × {counted(len(report["seeds"]), "seed")} '
        f'({", ".join(map(str, report["seeds"]))}) · {report["params"]["duration"]:g} s · '
        f'CLAP {report["clap_model"] or "none"} · real set: {report["dataset"] or "none"}',
        '',
        '| model | ' + ' | '.join(f'{COLUMNS[c]} {_arrow(c)}' for c in cols) + ' | clips |',
        '|---|' + '---:|' * (len(cols) + 1),
    ]
    for model in report['models']:
        cells = []
        for key in cols:
            value = model['metrics'].get(key)
            text = _fmt(value)
            cells.append(f'**{text}**' if value is not None and value == _best(report, key) else text)
        lines.append(f'| {model["label"]} | ' + ' | '.join(cells) + f' | {model["n_clips"]} |')
    real = report['real']['metrics']
    if 'clap_real' in real:
        lines.append(
            '| real clips (valid) | '
            + ' | '.join(_fmt(real['clap_real']) if c == 'clap' else '—' for c in cols)
            + f' | {real.get("n_real", 0)} |'
        )
    by_prompt = _clap_by_prompt(report)
    if by_prompt:
        lines += [
            '',
            '## CLAP score per prompt (mean over seeds)',
            '',
            '| prompt | ' + ' | '.join(m['label'] for m in report['models']) + ' |',
            '|---|' + '---:|' * len(report['models']),
        ]
        for prompt in report['prompts']:
            lines.append(
                f'| {prompt} | '
                + ' | '.join(_fmt(by_prompt.get((prompt, i))) for i in range(len(report['models'])))
                + ' |'
            )
    caveats = notes(report)
    if caveats:
        lines += ['', '## Notes', ''] + [f'- {n}' for n in caveats]
    lines += [
        '',
        '## Files',
        '',
        '- `index.html`: the listening page',
        '- `report.json`: every number above, per clip',
        *[
            f'- `{m["folder"]}/`: clips of {m["label"]} (with the JSON sidecars of scripts/generate.py)'
            for m in report['models']
        ],
    ]
    return '\n'.join(lines) + '\n'


def _clap_by_prompt(report: dict) -> dict[tuple[str, int], float]:
    sums: dict[tuple[str, int], list[float]] = {}
    for clip in report['clips']:
        if clip.get('clap') is not None:
            sums.setdefault((clip['prompt'], clip['model']), []).append(clip['clap'])
    return {k: sum(v) / len(v) for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------------- HTML
_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1b1f24; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } .meta { color: #57606a; margin: 0 0 16px; }
table { border-collapse: collapse; } th, td { border: 1px solid #d0d7de; padding: 6px 10px; vertical-align: top; }
table.metrics th { background: #dbe9f7; } table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics td.name { text-align: left; } td.best { font-weight: 700; background: #e6f4ea; }
ul.notes { color: #57606a; max-width: 1100px; } table.clips th { background: #f3f5f7; position: sticky; top: 0; }
td.prompt { font-weight: 600; max-width: 200px; } figure { margin: 0 0 10px; }
figure img { display: block; width: 320px; height: 120px; } audio { width: 320px; display: block; }
figcaption { color: #57606a; font-size: 12px; }
"""


def _url(path: str) -> str:
    return urllib.parse.quote(path)


def _figure(clip: dict, caption: str) -> str:
    score = '' if clip.get('clap') is None else f' · CLAP {clip["clap"]:.3f}'
    return (
        f'<figure><img src="{_url(clip["spectrogram"])}" alt="spectrogram" loading="lazy">'
        f'<audio controls preload="none" src="{_url(clip["file"])}"></audio>'
        f'<figcaption>{html.escape(caption)}{score}</figcaption></figure>'
    )


def page(report: dict) -> str:
    """index.html of a report (see the module docstring)."""
    esc = html.escape
    cols = _columns(report)
    head = ''.join(f'<th>{esc(COLUMNS[c])} {_arrow(c)}</th>' for c in cols)
    rows = []
    for model in report['models']:
        cells = []
        for key in cols:
            value = model['metrics'].get(key)
            best = value is not None and value == _best(report, key)
            cells.append(f'<td{" class=best" if best else ""}>{_fmt(value)}</td>')
        rows.append(f'<tr><td class="name">{esc(model["label"])}</td>{"".join(cells)}<td>{model["n_clips"]}</td></tr>')
    real = report['real']
    if 'clap_real' in real['metrics']:
        real_cells = ''.join(f'<td>{_fmt(real["metrics"]["clap_real"]) if c == "clap" else "—"}</td>' for c in cols)
        rows.append(
            f'<tr><td class="name">real clips (valid)</td>{real_cells}<td>{real["metrics"]["n_real"]}</td></tr>'
        )
    real_by_prompt = {c['prompt']: c for c in real['clips']}
    grid_head = (
        '<th>prompt</th>'
        + ('<th>real clip</th>' if real_by_prompt else '')
        + ''.join(f'<th>{esc(m["label"])}</th>' for m in report['models'])
    )
    grid = []
    for prompt in report['prompts']:
        cells = [f'<td class="prompt">{esc(prompt)}</td>']
        if real_by_prompt:
            clip = real_by_prompt.get(prompt)
            cells.append(f'<td>{_figure(clip, "valid clip") if clip else "—"}</td>')
        for index in range(len(report['models'])):
            clips = [c for c in report['clips'] if c['model'] == index and c['prompt'] == prompt]
            cells.append('<td>' + ''.join(_figure(c, f'seed {c["seed"]}') for c in clips) + '</td>')
        grid.append(f'<tr>{"".join(cells)}</tr>')
    meta = (
        f'{esc(report["created"])} · {counted(len(report["prompts"]), "prompt")} × '
        f'{counted(len(report["seeds"]), "seed")} · '
        f'{report["params"]["duration"]:g} s · CLAP {esc(str(report["clap_model"] or "none"))} · real set: '
        f'{esc(str(report["dataset"] or "none"))}'
    )
    caveats = ''.join(f'<li>{esc(n)}</li>' for n in notes(report))
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title>'
        f'<style>{_CSS}</style></head><body>\n<h1>Evaluation report</h1><p class="meta">{meta}</p>\n'
        f'<table class="metrics" id="metrics"><thead><tr><th>model</th>{head}<th>clips</th></tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table>\n<ul class="notes">{caveats}</ul>\n'
        f'<table class="clips" id="clips"><thead><tr>{grid_head}</tr></thead><tbody>{"".join(grid)}</tbody>'
        '</table>\n</body></html>\n'
    )


def write_report(folder: Path, report: dict) -> None:
    """Write report.json, summary.md and index.html into ``folder``."""
    atomic.write_bytes(
        folder / 'report.json',
        (json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + '\n').encode('utf-8'),
    )
    atomic.write_bytes(folder / 'summary.md', markdown(report).encode('utf-8'))
    atomic.write_bytes(folder / 'index.html', page(report).encode('utf-8'))
