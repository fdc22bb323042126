#!/usr/bin/env bash
# Makes .peer_carry/ (git-ignored): retro-pytorch 0.3.9 and einops unpacked, to be carried to a
# GPU machine that has torch but no internet, where bench/peer/gpu_run.sh puts it on the peer's
# PYTHONPATH. Run from anywhere, on a machine that reaches PyPI:
#   bench/peer/make_carry.sh            (PIP=... to choose the pip; default python3 -m pip)
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-python3 -m pip}
exclude="$(git rev-parse --git-common-dir)/info/exclude"
for p in /.peer_carry/ /bench/peer/wheels/; do
  grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >> "$exclude"
done
rm -rf .peer_carry bench/peer/wheels
$PIP download --quiet --no-deps -d bench/peer/wheels \
  "$(grep '^retro-pytorch==' bench/peer/requirements.txt)" "$(grep '^einops==' bench/peer/requirements.txt)"
mkdir -p .peer_carry
for w in bench/peer/wheels/*.whl; do python3 -m zipfile -e "$w" .peer_carry/; done
du -sh .peer_carry && ls .peer_carry
