# Waits (at most $1 seconds) for the background device script (bench/device_scale.sh, device_corrections.sh), then prints its tables and packs its tables, logs and
# profiles into $OUT/dev.tar.gz (what comes back from the device is at most 8 files).
end=$((SECONDS + ${1:-540}))
while [ ! -e /tmp/dev/done ] && [ $SECONDS -lt $end ]; do sleep 10; done
for f in /tmp/dev/*.md; do echo "== $f"; cat "$f"; done
tail -n 3 /tmp/dev/*.log 2>/dev/null | cut -c1-300
nvidia-smi --query-gpu=memory.used --format=csv,noheader
(cd /tmp/dev && tar czf $OUT/dev.tar.gz *.md *.log driver.log */profile_*.txt */rows.jsonl 2>/dev/null)
[ -e /tmp/dev/done ] && echo ALL-DONE || echo STILL-RUNNING
