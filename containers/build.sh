#!/usr/bin/env bash
# Build the alia-nemo Apptainer image from containers/alia-nemo.def (NeMo-RL release image + this package).
#
# Usage: containers/build.sh [--fakeroot] [--tag NEMO_RL_TAG] [--out IMAGE.sif]
#   --fakeroot   build without root (user namespaces; what most HPC login nodes allow)
#   --tag        NeMo-RL image tag (default v0.7.0)
#   --out        image to write (default alia-nemo.sif)
# Uses apptainer, or singularity when apptainer is not installed. Prints the image's size and digest.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
tag=v0.7.0
out=alia-nemo.sif
extra=()
while (($#)); do
  case "$1" in
    --fakeroot) extra+=(--fakeroot) ;;
    --tag) tag=${2:?--tag needs a value}; shift ;;
    --out) out=${2:?--out needs a value}; shift ;;
    -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $tag =~ ^[A-Za-z0-9._-]+$ ]] || { echo "build.sh: --tag $tag is not an image tag" >&2; exit 2; }

runtime=$(command -v apptainer || command -v singularity || true)
[[ -n $runtime ]] || { echo "build.sh: neither apptainer nor singularity is on PATH (module load apptainer?)" >&2; exit 1; }

"$runtime" build "${extra[@]}" --build-arg "NEMO_RL_TAG=$tag" --build-arg "ALIA_NEMO_SRC=$repo" \
  "$out" "$here/alia-nemo.def"
echo "image:  $out"
echo "size:   $(du -h "$out" | cut -f1)"
echo "sha256: $(sha256sum "$out" | cut -d' ' -f1)"
