"""Benchmark: scripts/prepare_dataset.py against audiocraft's own manifest tool on the same folder.

Both tools run as subprocesses (what a user types), side by side in one run, at 1 and 2 workers:

    python benchmarks/bench_prepare.py [--files 400] [--workers 1 2] [--repeats 2]

- ours:        python scripts/prepare_dataset.py ROOT --name bench --workers N   (decode, check, downmix, resample to
               16 kHz, write PCM16 WAVs + caption JSONs, split, manifests, preset, report)
- audiocraft:  python -m audiocraft.data.audio_dataset ROOT OUT --workers N      (reads headers only, writes a manifest)
- audiocraft --complete: same, but decodes every file to compute its amplitude (the closest stock equivalent of
               reading all the audio).

The corpus is synthesised in a temporary folder: mostly 44.1 kHz stereo WAVs (some 48 kHz stereo and 22.05 kHz mono)
of 2-6 s, each with a sidecar caption JSON. Wall time includes interpreter start-up and imports, which is what the
user waits for; the fixed cost of each tool (an empty folder) is measured too, so the per-file rate without it is shown.

``--library N`` measures instead how preparation scales to a library of N files (100,000 in docs/benchmarks.md),
with and without the steps that read libraries (tags, caption sources, audio hashes, families, the stable split):

    python benchmarks/bench_prepare.py --library 100000 --baseline /path/to/an/older/checkout

The library is generated in a temporary folder (never committed): 1 s 44.1 kHz mono WAVs in 100 folders, families of
4 takes, each with a RIFF INFO title and a caption JSON beside it. Each arm is a fresh ``python -m
scripts.prepare_dataset`` run; wall time, files/s and the peak RSS of the run's processes (``ru_maxrss`` from
``wait4``: the largest of the main process and its workers) are reported. Arms: the ``--baseline`` checkout (the code
before those steps), this checkout with its defaults (caption files win, tags are still read and cached), this
checkout captioning from tags and names only, then a re-run of each with nothing changed and with one added file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def make_corpus(root: Path, n_files: int, seed: int = 0) -> float:
    """Write ``n_files`` captioned WAVs under ``root`` (two sub-folders); return their total duration in seconds."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for i in range(n_files):
        kind = rng.random()
        sr, channels = (44100, 2) if kind < 0.7 else (48000, 2) if kind < 0.85 else (22050, 1)
        seconds = float(rng.uniform(2.0, 6.0))
        n = int(seconds * sr)
        t = np.arange(n) / sr
        tone = np.sin(2 * np.pi * rng.uniform(100, 3000) * t) * np.exp(-t * rng.uniform(0.2, 2))
        x = 0.3 * tone[:, None] + 0.05 * rng.standard_normal((n, channels))
        folder = root / f'part{i % 2}'
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(folder / f'clip_{i:05d}.wav', x.astype(np.float32), sr, subtype='PCM_16')
        (folder / f'clip_{i:05d}.json').write_text(json.dumps({'description': f'test tone number {i}'}))
        total += n / sr
    return total


def _run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} failed with status {proc.returncode}:\n{proc.stderr[-2000:]}')
    return elapsed


def commands(tool: str, root: Path, work: Path, workers: int, tag: str) -> list[str]:
    """Command line of one tool run writing into a fresh folder under ``work``."""
    out = work / tag
    if tool == 'ours':
        return [
            sys.executable,
            'scripts/prepare_dataset.py',
            str(root),
            '--name',
            'bench',
            '--workers',
            str(workers),
            '--out',
            str(out / 'data'),
            '--egs-root',
            str(out / 'egs'),
            '--config-root',
            str(out / 'cfg'),
            '--no-progress',
            '--max-seconds',
            '30',
        ]
    cmd = [
        sys.executable,
        '-m',
        'audiocraft.data.audio_dataset',
        str(root),
        str(out / 'data.jsonl.gz'),
        '--workers',
        str(workers),
    ]
    return cmd + (['--complete'] if tool == 'audiocraft --complete' else [])


def main() -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--files', type=int, default=400, help='number of synthetic files (default: 400)')
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 2], help='worker counts (default: 1 2)')
    parser.add_argument('--repeats', type=int, default=2, help='runs per cell; the median is reported (default: 2)')
    parser.add_argument('--no-complete', action='store_true', help='skip audiocraft --complete')
    parser.add_argument('--library', type=int, default=0, metavar='N', help='measure a generated library of N files')
    parser.add_argument('--baseline', type=Path, default=None, help='with --library: an older checkout to compare')
    parser.add_argument(
        '--tmp', type=Path, default=None, help='with --library: where to generate it (default: $TMPDIR)'
    )
    parser.add_argument('--no-tags-arm', action='store_true', help='with --library: skip the tags-and-names-only arm')
    args = parser.parse_args()
    if args.library:
        bench_library(args.library, max(args.workers), args.baseline, args.tmp, tags_arm=not args.no_tags_arm)
        return

    tools = ['ours', 'audiocraft'] + ([] if args.no_complete else ['audiocraft --complete'])
    with tempfile.TemporaryDirectory(prefix='bench_prepare_') as tmp:
        tmp_path = Path(tmp)
        # Like a user's machine: bytecode caches on (some sandboxes set PYTHONDONTWRITEBYTECODE, which makes every
        # start-up recompile torch), kept in the temp folder so the venv is not touched.
        env = {k: v for k, v in os.environ.items() if k != 'PYTHONDONTWRITEBYTECODE'}
        env.update(HF_HUB_OFFLINE='1', PYTHONWARNINGS='ignore', PYTHONPYCACHEPREFIX=str(tmp_path / 'pycache'))
        root, empty, work = tmp_path / 'corpus', tmp_path / 'empty', tmp_path / 'work'
        empty.mkdir()
        (empty / 'x.json').write_text('{}')
        start = time.perf_counter()
        seconds = make_corpus(root, args.files)
        print(
            f'corpus: {args.files} files, {seconds / 3600:.3f} h of audio, written in '
            f'{time.perf_counter() - start:.1f} s; cpus: {os.cpu_count()}',
            flush=True,
        )

        fixed = {}
        for tool in tools:
            # Fixed cost: interpreter, imports, pool start, manifest writing, on a folder without audio.
            # Our tool exits 1 there ("nothing usable"), so measure it on one file instead.
            one = tmp_path / 'one'
            if not one.exists():
                make_corpus(one, 1, seed=1)
            _run(commands(tool, one, work, 1, f'warmup-{tool}'.replace(' ', '_')), env)  # fills bytecode caches
            runs = []
            for r in range(args.repeats):
                runs.append(_run(commands(tool, one, work, 1, f'fixed-{tool}-{r}'.replace(' ', '_')), env))
            fixed[tool] = statistics.median(runs)

        results: dict[tuple[str, int], list[float]] = {}
        for workers in args.workers:
            for r in range(args.repeats):
                order = tools if r % 2 == 0 else tools[::-1]  # alternate the order against cache/thermal bias
                for tool in order:
                    tag = f'{tool}-{workers}-{r}'.replace(' ', '_')
                    wall = _run(commands(tool, root, work, workers, tag), env)
                    results.setdefault((tool, workers), []).append(wall)
                    print(f'  {tool:22s} workers={workers} run {r + 1}: {wall:.2f} s', flush=True)

    hours = seconds / 3600
    print()
    print(
        f'{args.files} files, {hours:.3f} h of audio (44.1/48 kHz stereo + 22.05 kHz mono WAV), median of '
        f'{args.repeats} runs, wall time including start-up'
    )
    print()
    print(
        '| tool | workers | wall (s) | files/s | audio h/min | ours vs tool | fixed start-up (s) '
        '| files/s without start-up |'
    )
    print('|---|---|---|---|---|---|---|---|')
    for workers in args.workers:
        ours = statistics.median(results[('ours', workers)])
        for tool in tools:
            wall = statistics.median(results[(tool, workers)])
            ratio = (
                '1.00'
                if tool == 'ours'
                else f'{wall / ours:.2f}x faster'
                if wall >= ours
                else f'{ours / wall:.2f}x slower'
            )
            net = wall - fixed[tool]
            net_rate = f'{args.files / net:.0f}' if net > 0.05 else 'n/a'
            print(
                f'| {tool} | {workers} | {wall:.2f} | {args.files / wall:.0f} | {hours / (wall / 60):.2f} | '
                f'{ratio} | {fixed[tool]:.2f} | {net_rate} |'
            )


def _riff_chunk(cid: bytes, body: bytes) -> bytes:
    return cid + struct.pack('<I', len(body)) + body + (b'\0' if len(body) % 2 else b'')


def _wav_bytes(x: np.ndarray, sr: int, title: str) -> bytes:
    """A mono PCM16 WAV with a RIFF INFO title, built in memory (faster than libsndfile plus a tag writer)."""
    pcm = np.clip(np.rint(x * 32767), -32768, 32767).astype('<i2').tobytes()
    fmt = struct.pack('<HHIIHH', 1, 1, sr, sr * 2, 2, 16)
    info = _riff_chunk(b'LIST', b'INFO' + _riff_chunk(b'INAM', title.encode() + b'\0'))
    body = b'WAVE' + _riff_chunk(b'fmt ', fmt) + _riff_chunk(b'data', pcm) + info
    return b'RIFF' + struct.pack('<I', len(body)) + body


def make_library(root: Path, n_files: int, seed: int = 0) -> float:
    """Write a library of ``n_files`` 1 s WAVs (100 folders, families of 4 takes, a title tag and a caption JSON each).

    Returns:
        The total duration in seconds.
    """
    rng = np.random.default_rng(seed)
    sr = 44100
    t = np.arange(sr) / sr
    tones = [
        np.sin(2 * np.pi * f * t) * np.exp(-t * d) for f, d in zip(rng.uniform(100, 3000, 64), rng.uniform(0.5, 4, 64))
    ]
    words = ['door', 'glass', 'metal', 'wood', 'water', 'wind', 'engine', 'bird', 'crowd', 'paper', 'rope', 'stone']
    for i in range(n_files):
        family, take = divmod(i, 4)
        folder = root / f'Kind{family % 100:03d}'
        if take == 0 and family < 100:
            folder.mkdir(parents=True, exist_ok=True)
        name = f'{words[family % 12].title()}_{words[(family // 12) % 12].title()}_{family:06d}_{take + 1:02d}'
        x = 0.3 * tones[family % 64] + 0.01 * rng.standard_normal(sr)  # distinct audio: no duplicates
        caption = f'{words[family % 12]} and {words[(family // 12) % 12]} number {family}'
        (folder / f'{name}.wav').write_bytes(_wav_bytes(x, sr, caption))
        (folder / f'{name}.json').write_text(json.dumps({'description': caption}))
    return float(n_files)


def _measure(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a command: the largest ``ru_maxrss`` of its process and its workers."""
    start = time.perf_counter()
    with open(log, 'wb') as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise RuntimeError(f'{" ".join(cmd)} failed with status {proc.returncode}:\n{log.read_text()[-2000:]}')
    return elapsed, usage.ru_maxrss / 1024


def bench_library(n_files: int, workers: int, baseline: Path | None, tmp_root: Path | None, tags_arm: bool) -> None:
    """Prepare a generated library of ``n_files`` with each arm, then re-run unchanged and with one file added."""
    with tempfile.TemporaryDirectory(prefix='bench_library_', dir=tmp_root) as tmp:
        tmp_path = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k != 'PYTHONDONTWRITEBYTECODE'}
        env.update(HF_HUB_OFFLINE='1', PYTHONWARNINGS='ignore', PYTHONPYCACHEPREFIX=str(tmp_path / 'pycache'))
        root = tmp_path / 'library'
        start = time.perf_counter()
        make_library(root, n_files)
        print(f'library: {n_files} files written in {time.perf_counter() - start:.0f} s; cpus: {os.cpu_count()}')
        arms = [('this checkout, defaults', PROJECT_ROOT, [])]
        if tags_arm:
            tags_only = ['--captions-from', 'tags,ucs,names']
            arms.append(('this checkout, --captions-from tags,ucs,names', PROJECT_ROOT, tags_only))
        if baseline is not None:
            arms.insert(0, (f'baseline {baseline}', baseline.resolve(), []))
        rows = []
        for phase in ('first run', 'unchanged re-run', 're-run, one file added'):
            if phase == 're-run, one file added':
                (root / 'Kind000' / 'Added_Sound_01.wav').write_bytes(_wav_bytes(np.zeros(44100) + 0.1, 44100, 'added'))
                (root / 'Kind000' / 'Added_Sound_01.json').write_text('{"description": "an added sound"}')
            for i, (label, checkout, extra) in enumerate(arms):
                out = tmp_path / f'arm{i}'
                cmd = [sys.executable, '-m', 'scripts.prepare_dataset', str(root), '--name', 'bench', '--workers']
                cmd += [str(workers), '--out', str(out / 'data'), '--egs-root', str(out / 'egs'), '--config-root']
                cmd += [str(out / 'cfg'), '--no-progress', *extra]
                arm_env = dict(env, PYTHONPATH=str(checkout))
                wall, rss = _measure(cmd, checkout, arm_env, tmp_path / f'arm{i}.log')
                lines = (tmp_path / f'arm{i}.log').read_text().splitlines()
                keep = ('audio files:', 'captions:', 'clips,')
                summary = [line.strip().split(' (review')[0] for line in lines if any(k in line for k in keep)]
                rows.append((phase, label, wall, rss, ' / '.join(summary)))
                print(f'  {phase:24s} {label:50s} {wall:8.1f} s {rss:7.0f} MB', flush=True)
    print()
    print(f'{n_files} files of 1 s (44.1 kHz mono PCM16, a title tag and a caption JSON each), --workers {workers}')
    print()
    print('| run | code | wall (s) | files/s | peak RSS (MB) | summary |')
    print('|---|---|---|---|---|---|')
    for phase, label, wall, rss, summary in rows:
        print(f'| {phase} | {label} | {wall:.1f} | {n_files / wall:.0f} | {rss:.0f} | {summary} |')


if __name__ == '__main__':
    main()
