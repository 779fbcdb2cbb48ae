#!/usr/bin/env bash
# Prepare the GPU kit on a machine with the package registry: download, for Python 3.12 on
# manylinux x86-64, the wheels that the GPU machine lacks (benchmarks/gpu/wheels.txt) into
# .gpu-wheels/ (ignored by git; carry it to the GPU machine), and print its size.
#
#   benchmarks/gpu/prepare.sh          # download
#   benchmarks/gpu/prepare.sh --cpu    # dry run: check the list and the ignore rule, download nothing
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.gpu-wheels
LIMIT_MIB=40
CPU=0
for a in "$@"; do
  case "$a" in
    --cpu) CPU=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "prepare.sh: unknown argument $a (see --help)" >&2; exit 2 ;;
  esac
done
mapfile -t SPECS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' benchmarks/gpu/wheels.txt | grep -v '^$')
for s in "${SPECS[@]}"; do
  [[ "$s" == *==* ]] || { echo "prepare.sh: '$s' in wheels.txt is not pinned (name==version)" >&2; exit 2; }
done
if git rev-parse --git-dir >/dev/null 2>&1 && ! git check-ignore -q "$DEST/x.whl"; then
  echo "prepare.sh: $DEST/ is not ignored by git; it must not be committed (add /$DEST/ to .gitignore)" >&2
  exit 2
fi
echo "wheels for the GPU machine (${#SPECS[@]}): ${SPECS[*]}"
if [[ $CPU == 1 ]]; then
  echo "dry run (--cpu): nothing downloaded; the kit runs on the CPU with this machine's packages"
  exit 0
fi
rm -rf "$DEST" && mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${SPECS[@]}"
n=$(ls "$DEST"/*.whl | wc -l)
[[ $n == "${#SPECS[@]}" ]] || { echo "prepare.sh: expected ${#SPECS[@]} wheels, got $n" >&2; exit 1; }
kib=$(du -sk "$DEST" | cut -f1)
echo "$DEST: $n wheels, $((kib / 1024)) MiB (limit $LIMIT_MIB MiB)"
(( kib <= LIMIT_MIB * 1024 )) || { echo "prepare.sh: over $LIMIT_MIB MiB" >&2; exit 1; }
