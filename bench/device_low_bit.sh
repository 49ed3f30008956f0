# bench/low_bit.py on the lent GPU for a real checkpoint too large for one call's carry (issue 16). The model
# travels as its published GGUF, split over several calls into .xfer/gNN/ (ignored paths stay on the warm
# machine between calls), and is rebuilt there exactly as ../shared/models/fetch_real.py does here:
#   STEP=setup (carry .whl .venv/share/haloquant .xfer/g00 ...): installs the wheels (bench/device_setup.sh);
#   STEP=part  (carry .xfer/gNN): nothing but the transfer;
#   STEP=run   (carry the last part): joins the parts, checks their sha256, rebuilds the HF folder at $MODEL (the
#              path used here, so the sensitivity journal's key matches), starts low_bit.py with --device cuda in
#              the background (setsid) with $ARGS, then polls like STEP=poll;
#   STEP=poll: waits up to $WAIT s, returns the small results (tables, score.json files, sensitivity.json, its
#              journal, logs) in $OUT/lowbit.tgz.
set -u
MODEL=${MODEL:-/work/models/real/qwen2.5-coder-0.5b} RUN=/tmp/lowbit
if [ "$STEP" = setup ]; then
    source bench/device_setup.sh || exit 1
    python3 -c "import transformers, pydantic, llama_cpp, gguf; print('setup ok', transformers.__version__)"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; exit 0
fi
[ "$STEP" = part ] && { du -sh .xfer/*; exit 0; }
export PYTHONPATH=/tmp/site:$PWD:$PWD/.venv/share/haloquant/llama.cpp/gguf-py
export HALOQUANT_LLAMA_CONVERTER=$PWD/.venv/share/haloquant/llama.cpp DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
if [ "$STEP" = run ]; then
    mkdir -p $RUN /tmp/gguf
    cat .xfer/g*/part* > /tmp/gguf/model.gguf
    (cd /tmp/gguf && sha256sum model.gguf) | tee $RUN/sha.txt
    python3 bench/gguf_to_hf.py /tmp/gguf/model.gguf "$MODEL" --check .xfer/g00/sums.json > $RUN/convert.log 2>&1 \
        || { cat $RUN/convert.log; exit 1; }
    tail -n 2 $RUN/convert.log
    setsid bash -c "python3 bench/low_bit.py --model $MODEL --device cuda --out $RUN $ARGS > $RUN/low_bit.log 2>&1; \
        touch $RUN/done" < /dev/null > /dev/null 2>&1 &
fi
end=$((SECONDS + ${WAIT:-500}))
while [ ! -e $RUN/done ] && [ $SECONDS -lt $end ]; do sleep 10; done
grep -v "it/s\]$" $RUN/low_bit.log | tail -n 25 | cut -c1-400
wc -l $RUN/sensitivity.resume/*.jsonl 2>/dev/null
(cd $RUN && tar czf $OUT/lowbit.tgz --exclude='*.npy' --exclude='*.gguf' --exclude='*.safetensors' \
    *.log *.txt *.md *.json sensitivity sensitivity.resume */*/gguf/score.json */*/allocate F16/gguf/score.json 2>/dev/null)
[ -e $RUN/done ] && echo ALL-DONE || echo STILL-RUNNING
