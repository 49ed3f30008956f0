# End-to-end tuning variants on the lent GPU (bench/end_to_end.py tune), for a model too large for one call's
# carry: the first call (STEP=unpack) installs the carried wheels and unpacks .xfer/a's model part into /tmp/m;
# the next call, on the still-warm machine (STEP=tune), unpacks .xfer/b's part and tunes each row of .xfer/b/rows
# (a bench row's quantize/ and scale_fold/, calibrated by .xfer/b/calibrate) with the SETTINGS (JSON objects,
# one per variant); the variants' deltas come back in $OUT/e2e.tgz for `bench/end_to_end.py score` here.
unxz() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$@"; }
export PYTHONPATH=/tmp/site:$PWD DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
if [ "$STEP" = unpack ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .xfer/a/whl/*.whl
    mkdir -p /tmp/m && cp .xfer/a/m/*.json /tmp/m/
    for f in .xfer/a/m/*.xz; do unxz "$f" "/tmp/m/$(basename "$f" .xz)"; done
    ls -la /tmp/m; nvidia-smi --query-gpu=name,memory.used --format=csv
else
    for f in .xfer/b/m/*.xz; do unxz "$f" "/tmp/m/$(basename "$f" .xz)"; done
    for row in .xfer/b/rows/*/; do
        name=$(basename "$row")
        eval "set -- $SETTINGS"
        timeout "${BUDGET:-480}" python3 bench/end_to_end.py tune --model /tmp/m --row "$row" --calib .xfer/b/calibrate \
            --out "/tmp/e2e/$name" --settings "$@" 2>&1 | grep -v "it/s\]$"
    done
    tar czf "$OUT/e2e.tgz" -C /tmp e2e
fi
