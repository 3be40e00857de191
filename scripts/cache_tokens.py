"""Encode every clip of a prepared dataset once with the package's codec: the token cache `token_cache=true` reads.

Usage: python -m scripts.cache_tokens dataset=mysounds                     (the same overrides as `dora run`)
       python -m scripts.cache_tokens solver=audiogen/demo                 (the demo's dataset and package)
       audiogen-cache-tokens dataset=mysounds model=audiogen_medium

The cache lives beside the dataset: <data root>/data/<name>/tokens/<codec checksum>/. Re-running it encodes only
clips that were added or re-prepared (or all of them for another codec); a Ctrl-C keeps the shards written so far.
Then train on it: dora run solver=audiogen/train dataset=mysounds token_cache=true
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Build the cache, print what was encoded and where it is."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('overrides', nargs='*', help='dora run overrides that choose the dataset and package')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)
    from solvers.errors import run_cli

    def body() -> int:
        from solvers.training import token_cache

        report = token_cache.build_from_overrides(args.overrides, progress=not args.no_progress)
        print(
            f'Token cache {report.folder}: {report.encoded} clips encoded now, {report.kept} already cached, '
            f'{report.removed} stale entries dropped.\n'
            f'Train on it: dora run {" ".join(args.overrides)} token_cache=true'
        )
        return 0

    return run_cli(
        'cache_tokens', body, interrupted='interrupted; the shards written so far are kept: re-run to go on.'
    )


if __name__ == '__main__':
    sys.exit(main())
