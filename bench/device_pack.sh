# Packs a model for bench/device_low_bit.sh on this (CPU) machine: its published GGUF (and any extra wheels, e.g.
# AutoRound's environment for PAIRS) as one tar split into .xfer/x1/blob.part1, .xfer/x2/blob.part2, …, each part
# as large as one device call can carry beside the working tree (the run tool's carry limit is 64 MiB for the
# tracked files and the carried paths together). Prints the tar's sha256 (device_low_bit.sh's SHA).
#   bash bench/device_pack.sh MODEL.gguf [WHEEL_DIR]
# Earlier parts in .xfer/x* are removed first (.xfer/meta stays).
set -eu
gguf=$1 wheels=${2:-}
[ -f "$gguf" ] || { echo "device_pack: $gguf is not a file" >&2; exit 2; }
[ -z "$wheels" ] || [ -d "$wheels" ] || { echo "device_pack: $wheels is not a folder of wheels" >&2; exit 2; }
limit=$((64 * 1024 * 1024 - 512 * 1024))  # 512 KiB spare for files added after packing
tree=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1)
part=$((limit - tree))
[ $part -gt 8000000 ] || { echo "device_pack: the working tree ($tree bytes) leaves no room for a part" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf $tmp' EXIT
ln -s "$(realpath "$gguf")" $tmp/model.gguf
[ -n "$wheels" ] && ln -s "$(realpath "$wheels")" $tmp/wheels
tar chf $tmp/blob.tar -C $tmp model.gguf $([ -n "$wheels" ] && echo wheels)
rm -rf .xfer/x[0-9]*
split -b $part -d -a 2 $tmp/blob.tar $tmp/blob.part
n=0
for p in $(ls $tmp/blob.part* | sort); do
    n=$((n + 1)); mkdir -p .xfer/x$n; mv $p .xfer/x$n/blob.part$n
done
echo "$n parts of at most $part bytes (tree $tree bytes); SHA=$(sha256sum $tmp/blob.tar | cut -d' ' -f1)"
