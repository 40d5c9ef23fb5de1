#!/usr/bin/env bash
# yet-another-retnet 0.5.1's own tests (tests/test_retention.py and tests/test_retnet.py from its
# sdist on PyPI, unmodified) against the installed yet_another_retnet package, i.e. ours.
# Nothing is copied into this repository: the files are read from the sdist in a temp dir.
# Usage: bash scripts/run-051-suite.sh [pytest args...]
set -euo pipefail
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# 0.5.1's setup reads its version from git or $YET_ANOTHER_RETNET_VERSION; an sdist has no git.
YET_ANOTHER_RETNET_VERSION=0.5.1 python -m pip download --quiet --disable-pip-version-check \
    --no-binary :all: --no-deps --dest "$work" "yet-another-retnet==0.5.1"
tar -xzf "$work"/yet-another-retnet-0.5.1.tar.gz -C "$work"
mkdir "$work/suite"
# Only the two test files: the sdist's own package must not be importable from there.
cp "$work/yet-another-retnet-0.5.1/tests/test_retention.py" "$work/yet-another-retnet-0.5.1/tests/test_retnet.py" \
    "$work/suite/"
cd "$work/suite"
python -c "import yet_another_retnet as y; print('testing', y.__file__, 'version', y.__version__)"
python -m pytest -q -p no:cacheprovider -c /dev/null --rootdir . -W ignore::DeprecationWarning \
    test_retention.py test_retnet.py "$@"
