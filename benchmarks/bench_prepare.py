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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    args = parser.parse_args()

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


if __name__ == '__main__':
    main()
